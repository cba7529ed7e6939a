"""The model registry: finds checkpoints, loads each on its backend, warms it, serves it.

A :class:`ModelRuntime` is one served model: a backend instance, one solve thread (every backend
call, load, warm-up and unload included, runs there and never on the event loop) and its
scheduler: the iteration-level :class:`~service.engine.Engine` when the backend can step its
model (torch), else the batch-level :class:`~service.batcher.Batcher` (onnxruntime's whole-solve
graph; docs/onnx.md says why). The :class:`ModelRegistry` holds them by name; a model's name is
its checkpoint directory's name.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from models import CheckpointError

from .backends import (
    Backend,
    BatchRequest,
    BatchResult,
    ModelInfo,
    SteppedBackend,
    UnsupportedModel,
    get_backend,
)
from .batcher import Batcher
from .engine import Engine
from .errors import ModelNotFound
from .metrics import Metrics
from .settings import Settings

log = logging.getLogger("fpn_serve.runtime")

CONFIG_FILE = "config.json"


class StartupError(RuntimeError):
    """The service cannot start: no checkpoints, an unreadable one, or limits it cannot honour."""


class ModelRuntime:
    """One served model. Not ready until loaded and warmed."""

    def __init__(self, name: str, path: Path, settings: Settings, metrics: Metrics) -> None:
        self.name = name
        self.path = path
        self.settings = settings
        self.metrics = metrics
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"solve-{name}")
        self.backend: Backend | None = None
        self.info: ModelInfo | None = None
        self.ready = False
        self.error: str | None = None
        self.extra_outputs: dict[str, tuple[np.dtype, list[int]]] = {}  # seen at warm-up
        self.scheduler: Engine | Batcher | None = None  # made once the backend is loaded

    @property
    def loaded_info(self) -> ModelInfo:
        """The loaded model's info; callers check ``ready`` first, so a miss here is a bug."""
        if self.info is None:
            raise RuntimeError(f"model {self.name!r} is not loaded")
        return self.info

    @property
    def loaded_scheduler(self) -> Engine | Batcher:
        """The scheduler made at load; callers check ``ready`` first, so a miss here is a bug."""
        if self.scheduler is None:
            raise RuntimeError(f"model {self.name!r} is not loaded")
        return self.scheduler

    def _make_scheduler(self, backend: Backend) -> Engine | Batcher:
        s = self.settings
        if isinstance(backend, SteppedBackend):
            return Engine(
                self.name,
                backend.program(),
                max_batch_size=s.max_batch_size,
                max_queue_size=s.max_queue_size,
                metrics=self.metrics,
            )
        log.info("model %s: backend %s solves whole batches (no per-iteration scheduling)",
                 self.name, s.backend)  # fmt: skip
        return Batcher(
            self.name,
            self._solve,
            self.executor,
            max_batch_size=s.max_batch_size,
            max_queue_delay_ms=s.max_queue_delay_ms,
            max_queue_size=s.max_queue_size,
            metrics=self.metrics,
        )

    # --- on the solve thread ------------------------------------------------------------------
    def _solve(self, request: BatchRequest) -> BatchResult:
        backend = self.backend
        if backend is None:
            raise RuntimeError(f"model {self.name!r} is not loaded")
        return backend.predict(request)

    def _load(self) -> tuple[Backend, ModelInfo]:
        backend = get_backend(self.settings.backend)()
        try:
            info = backend.load(
                self.path, device=self.settings.device, num_threads=self.settings.num_threads
            )
        except UnsupportedModel:
            raise
        except CheckpointError as exc:
            raise StartupError(str(exc)) from None
        except (RuntimeError, ValueError, OSError) as exc:
            raise StartupError(
                f"{self.path}: cannot load on {self.settings.device}: {exc}"
            ) from exc
        self._check_limits(info)
        return backend, info

    def _check_limits(self, info: ModelInfo) -> None:
        solver, limits = info.config.solver, self.settings.limits
        checks = (limits.tol_problem(solver.tol), limits.max_iter_problem(solver.max_iter))
        problems = [f"default {problem}" for problem in checks if problem is not None]
        if info.default_solver not in info.solvers:
            problems.append(
                f"default solver {info.default_solver!r} is not one of {list(info.solvers)}"
            )
        if problems:
            raise StartupError(f"{self.path / CONFIG_FILE}: " + "; ".join(problems))

    def _warm(self, backend: Backend, info: ModelInfo) -> tuple[float, int]:
        """Solve batch 1 and a full batch with every solver; return (seconds, iterations) of the
        full default-solver batch, the batcher's first cost estimate. Also records the family's
        extra outputs (names, dtypes, per-sample shapes) for the V2 metadata."""
        rng = np.random.default_rng(0)
        solver = info.config.solver
        cost = (0.0, 1)
        for method in info.solvers:
            for size in sorted({1, self.settings.max_batch_size}):
                x = rng.random((size, *info.config.input.shape), dtype=np.float32)
                request = BatchRequest(
                    x=x,
                    tol=np.full(size, solver.tol, dtype=np.float64),
                    max_iter=np.full(size, solver.max_iter, dtype=np.int64),
                    solver=method,
                )
                start = time.perf_counter()
                result = backend.predict(request)
                if method == info.default_solver:
                    cost = (time.perf_counter() - start, int(result.iterations.max()))
                self.extra_outputs = {
                    k: (np.asarray(v).dtype, list(np.shape(v)[1:]))
                    for k, v in result.extras.items()
                }
        return cost

    # --- on the event loop --------------------------------------------------------------------
    async def load(self) -> None:
        loop = asyncio.get_running_loop()
        backend, info = await loop.run_in_executor(self.executor, self._load)
        self.backend, self.info = backend, info
        self.scheduler = scheduler = self._make_scheduler(backend)
        scheduler.start()
        self._publish()

    async def warm(self) -> None:
        backend, info, scheduler = self.backend, self.info, self.scheduler
        if backend is None or info is None or scheduler is None:
            raise RuntimeError(f"model {self.name!r} must be loaded before it is warmed")
        if self.settings.warmup:
            loop = asyncio.get_running_loop()
            seconds, iterations = await loop.run_in_executor(
                self.executor, self._warm, backend, info
            )
            scheduler.observe_cost(seconds, iterations)
        self.ready = True
        log.info("model %s ready on %s (%s)", self.name, info.device, self.settings.backend)

    async def reload(self) -> ModelInfo:
        """Load and warm a fresh copy from disk on a thread of its own while the current model
        keeps serving, then swap it in between two batches.

        A reload may not change the input shape or the classes (requests already queued were
        checked against them): restart for that.
        """
        loop = asyncio.get_running_loop()
        previous, scheduler = self.backend, self.scheduler
        if previous is None or self.info is None or scheduler is None:
            raise RuntimeError(f"model {self.name!r} must be loaded before it is reloaded")
        with ThreadPoolExecutor(1, thread_name_prefix=f"reload-{self.name}") as loader:
            backend, info = await loop.run_in_executor(loader, self._load)
            old = self.info.config
            if (info.config.input.shape, info.config.classes) != (old.input.shape, old.classes):
                await loop.run_in_executor(loader, backend.unload)
                raise StartupError(
                    f"{self.path / CONFIG_FILE}: input shape or classes changed; restart the "
                    "service to serve a different interface"
                )
            if self.settings.warmup:
                seconds, iterations = await loop.run_in_executor(loader, self._warm, backend, info)
                scheduler.observe_cost(seconds, iterations)
        self.backend, self.info = backend, info
        if isinstance(scheduler, Engine) and isinstance(backend, SteppedBackend):
            scheduler.swap(backend.program())
        # Queued behind any batch in progress on the solve thread, which still uses `previous`
        # (the engine's rows that started on it keep its parts alive until they finish).
        await loop.run_in_executor(self.executor, previous.unload)
        self._publish()
        return info

    async def stop(self) -> None:
        """Refuse new requests, finish the queued ones, release the model."""
        self.ready = False
        if self.scheduler is not None:
            await self.scheduler.stop()
        if self.backend is not None:
            await asyncio.get_running_loop().run_in_executor(self.executor, self.backend.unload)
        self.executor.shutdown(wait=True)
        self.metrics.forget_model(self.name)

    def _publish(self) -> None:
        if self.info is not None:
            self.metrics.set_model(
                self.name,
                family=self.info.config.family,
                backend=self.settings.backend,
                device=self.info.device,
            )


class ModelRegistry:
    """Every served model by name, and whether all of them are ready."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.models: dict[str, ModelRuntime] = {}
        self.closing = False

    def discover(self) -> list[Path]:
        """``model_dir`` itself when it is a checkpoint, else its checkpoint subdirectories."""
        root = Path(self.settings.model_dir)
        if not root.is_dir():
            raise StartupError(f"FPN_MODEL_DIR {root} is not a directory")
        if (root / CONFIG_FILE).is_file():
            return [root]
        found = sorted(
            p for p in root.iterdir()
            if p.is_dir() and not p.name.startswith(".") and (p / CONFIG_FILE).is_file()
        )  # fmt: skip
        if not found:
            raise StartupError(
                f"no checkpoints in FPN_MODEL_DIR {root}: "
                f"expected subdirectories with {CONFIG_FILE}"
            )
        return found

    async def load_all(self) -> None:
        """Load every checkpoint. Fails fast, naming the file, on the first that cannot load;
        a valid checkpoint that the configured backend cannot serve is skipped with an error
        in the log, so one such model does not keep the others from serving."""
        for path in self.discover():
            runtime = ModelRuntime(path.name, path, self.settings, self.metrics)
            try:
                await runtime.load()
            except UnsupportedModel as exc:
                log.error("skipping model %s: %s", path.name, exc)
                runtime.executor.shutdown(wait=False)
                continue
            self.models[path.name] = runtime
            log.info("loaded %s from %s", path.name, path)

    async def warm_all(self) -> None:
        """Warm every model (concurrently, each on its own thread); failures are logged and
        leave that model, and so the service, not ready."""
        results = await asyncio.gather(
            *(m.warm() for m in self.models.values()), return_exceptions=True
        )
        for runtime, result in zip(self.models.values(), results, strict=True):
            if isinstance(result, BaseException):
                runtime.error = f"warm-up failed: {result}"
                log.error("model %s: %s", runtime.name, runtime.error, exc_info=result)

    def get(self, name: str) -> ModelRuntime:
        try:
            return self.models[name]
        except KeyError:
            raise ModelNotFound(
                f"no model named {name!r}; available: {sorted(self.models)}"
            ) from None

    @property
    def ready(self) -> bool:
        return bool(self.models) and not self.closing and all(m.ready for m in self.models.values())

    async def close(self) -> None:
        self.closing = True
        await asyncio.gather(*(m.stop() for m in self.models.values()), return_exceptions=True)
