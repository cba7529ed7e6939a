"""Service test fixtures: MNIST, a tiny trained checkpoint, real ``fpn-serve`` processes on
loopback ports (session-scoped), and a fake backend for logic tests through the app factory.

The real-server tests run once per backend (``backend``: ``torch``, ``onnxruntime``): for
onnxruntime, the checkpoints are exported (``fpn-export``'s library call) into copies once per
session, the servers run with ``FPN_BACKEND=onnxruntime`` and the in-process reference
(``offline``) is the same ``model.onnx`` run by onnxruntime in this process. How closely
onnxruntime follows torch is ``tests/models/test_export.py``'s business.
"""

from __future__ import annotations

import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from service_support import (
    REPO_ROOT,
    ServerProcess,
    intensities,
    launch_server,
    load_mnist,
    start_server,
    train_tiny_checkpoint,
)

from models import (
    ArchConfig,
    ImplicitOutput,
    ModelConfig,
    SolverConfig,
    SolverStats,
    create_model,
    load_checkpoint,
    save_checkpoint,
)

ADMIN_TOKEN = "test-admin-token"
BUNDLED = REPO_ROOT / "checkpoints" / "mnist-fpn"


@pytest.fixture(scope="session")
def mnist_dir(data_dir: Path) -> Path:
    if not (data_dir / "mnist" / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST not found under {data_dir} (set FPN_DATA_DIR)")
    return data_dir


@pytest.fixture(scope="session")
def mnist_test(mnist_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images (10000, 28, 28) uint8, labels (10000,))."""
    return load_mnist(mnist_dir, "test")


BACKENDS = ("torch", "onnxruntime")


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request) -> str:
    """The backend the real servers run (``FPN_BACKEND``)."""
    if request.param == "onnxruntime":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnx")
    return request.param


def served_device(backend: str) -> str:
    """The device a server with ``FPN_DEVICE=auto`` reports for ``backend``."""
    if backend == "onnxruntime":
        import onnxruntime

        gpu = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
        return "cuda:0" if gpu else "cpu"
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def for_backend(root: Path, backend: str, tmp_path_factory) -> Path:
    """``root`` (a model directory) as ``backend`` serves it: itself for torch; for onnxruntime,
    a copy whose checkpoints carry a ``model.onnx``."""
    if backend != "onnxruntime":
        return root
    from models.onnx.export import export_checkpoint

    copy = tmp_path_factory.mktemp(f"{root.name}-onnx")
    for checkpoint in sorted(p for p in root.iterdir() if (p / "config.json").is_file()):
        shutil.copytree(checkpoint, copy / checkpoint.name)
        export_checkpoint(copy / checkpoint.name, samples=16)  # parity: tests/models/test_export
    return copy


def backend_env(backend: str) -> dict[str, str]:
    return {"FPN_BACKEND": backend}


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory, mnist_dir: Path) -> Path:
    """A model directory holding one tiny trained checkpoint, ``mnist-tiny``."""
    root = tmp_path_factory.mktemp("models")
    train_tiny_checkpoint(root / "mnist-tiny", mnist_dir)
    return root


@pytest.fixture(scope="session")
def model_dir(trained_dir: Path, backend: str, tmp_path_factory) -> Path:
    """``trained_dir`` as ``backend`` serves it (exported for onnxruntime)."""
    return for_backend(trained_dir, backend, tmp_path_factory)


class Offline:
    """The checkpoint run in the test process: the reference the service must reproduce."""

    def __init__(self, path: Path) -> None:
        self.checkpoint = load_checkpoint(path)
        self.model = self.checkpoint.model

    def predict(self, x: np.ndarray, **knobs):
        """x: (N, 1, 28, 28) float32 in [0, 1]; knobs as ``ImplicitClassifier.predict``.
        Runs on one thread, as the test servers do."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self.model.predict(torch.from_numpy(x), **knobs)
        finally:
            torch.set_num_threads(threads)

    def alone(self, x: np.ndarray, **knobs) -> list[tuple[int, int]]:
        """(label, iterations) of every sample solved on its own (batch of one)."""
        out = []
        for row in x:
            result = self.predict(row[None], **knobs)
            out.append((int(result.logits.argmax(1)), int(result.stats.iterations[0])))
        return out


class OnnxOffline(Offline):
    """The exported ``model.onnx`` run by onnxruntime in the test process (one thread)."""

    def __init__(self, path: Path) -> None:
        from models.onnx.runtime import onnx_session

        super().__init__(path)
        self.session = onnx_session(path / "model.onnx", threads=1)

    def predict(self, x: np.ndarray, *, tol=None, max_iter=None, solver=None) -> ImplicitOutput:
        from models.onnx.runtime import run_onnx

        defaults = self.model.config.solver
        out = run_onnx(
            self.session, x,
            tol=defaults.tol if tol is None else tol,
            max_iter=defaults.max_iter if max_iter is None else max_iter,
            solver=solver or defaults.method,
        )  # fmt: skip
        stats = SolverStats(
            *(torch.from_numpy(out[k]) for k in ("iterations", "residual", "converged"))
        )
        return ImplicitOutput(torch.from_numpy(out["logits"]), torch.empty(0), stats)


@pytest.fixture(scope="session")
def offline(model_dir: Path, backend: str) -> Offline:
    reference = OnnxOffline if backend == "onnxruntime" else Offline
    return reference(model_dir / "mnist-tiny")


@pytest.fixture(scope="session")
def digits(mnist_test) -> np.ndarray:
    """The first 256 MNIST test images as API inputs, (256, 1, 28, 28) float32."""
    return intensities(mnist_test[0][:256])


SERVERS = {
    # default batching (2 ms delay), and an admin token
    "server": {"FPN_ADMIN_TOKEN": ADMIN_TOKEN},
    # a generous queue delay (400 ms): requests sent together land in one batch
    "batching": {"FPN_MAX_QUEUE_DELAY_MS": "400", "FPN_MAX_BATCH_SIZE": "256"},
    # one sample per batch, one queued sample at most, 64 KiB bodies
    "tiny-queue": {
        "FPN_MAX_BATCH_SIZE": "1",
        "FPN_MAX_QUEUE_SIZE": "1",
        "FPN_MAX_BODY_BYTES": "65536",
    },
}


@pytest.fixture(scope="session")
def servers(model_dir: Path, backend: str, tmp_path_factory) -> Iterator[dict[str, ServerProcess]]:
    """Every session server, launched at once (start-up is mostly imports: do them in parallel)."""
    logs = {name: tmp_path_factory.mktemp(name) / "fpn-serve.log" for name in SERVERS}
    launched = {
        name: launch_server(model_dir, logs[name], {**env, **backend_env(backend)})
        for name, env in SERVERS.items()
    }
    yield launched
    for server in launched.values():
        _stop_cleanly(server)


def _stop_cleanly(server: ServerProcess) -> None:
    code = server.stop()
    # uvicorn re-raises the SIGTERM it handled once shutdown is complete: -15 is a clean exit.
    assert code in (0, -signal.SIGTERM), f"unclean exit ({code}):\n{server.log()}"
    assert "Traceback" not in server.log(), server.log()


def _ready(servers: dict[str, ServerProcess], name: str) -> ServerProcess:
    servers[name].wait_ready()
    return servers[name]


@pytest.fixture(scope="session")
def server(servers) -> ServerProcess:
    """``fpn-serve`` with default batching (2 ms delay) and an admin token."""
    return _ready(servers, "server")


@pytest.fixture(scope="session")
def batching_server(servers) -> ServerProcess:
    """A generous queue delay (400 ms): requests sent together land in one batch."""
    return _ready(servers, "batching")


@pytest.fixture(scope="session")
def tiny_queue_server(servers) -> ServerProcess:
    """FPN_MAX_BATCH_SIZE=1, FPN_MAX_QUEUE_SIZE=1, FPN_MAX_BODY_BYTES=65536."""
    return _ready(servers, "tiny-queue")


@pytest.fixture(scope="session")
def bundled_checkpoint() -> Path:
    """The bundled ``checkpoints/mnist-fpn`` (skips until it has been trained and committed)."""
    if not (BUNDLED / "model.safetensors").is_file():
        pytest.skip("checkpoints/mnist-fpn is not there yet")
    try:
        load_checkpoint(BUNDLED)
    except Exception as exc:  # a checkpoint being written
        pytest.skip(f"checkpoints/mnist-fpn cannot be loaded yet: {exc}")
    return BUNDLED


@pytest.fixture(scope="session")
def bundled_server(
    bundled_checkpoint: Path, backend: str, tmp_path_factory
) -> Iterator[ServerProcess]:
    """``fpn-serve`` on the bundled checkpoints (``mnist-fpn``, ...) on ``backend``."""
    root = bundled_checkpoint.parent
    if backend == "onnxruntime":  # only mnist-fpn: the other bundled models are not under test
        root = tmp_path_factory.mktemp("bundled-only")
        shutil.copytree(bundled_checkpoint, root / bundled_checkpoint.name)
        root = for_backend(root, backend, tmp_path_factory)
    log = tmp_path_factory.mktemp("bundled") / "log"
    server = start_server(root, log, backend_env(backend))
    yield server
    _stop_cleanly(server)


@pytest.fixture(scope="session")
def slow_server(tmp_path_factory, backend):
    """An untrained conv model whose default ``tol`` (1e-12, allowed by ``FPN_MIN_TOL``) float32
    never reaches: a default solve is 500 Picard iterations (~200 ms), a request may ask for up
    to 5,000; one sample per batch, one queued sample at most."""
    root = tmp_path_factory.mktemp("slow-models")
    config = ModelConfig(
        arch=ArchConfig(kind="conv", channels=32, gamma=0.99),
        solver=SolverConfig(method="picard", tol=1e-12, max_iter=500),
    )
    save_checkpoint(create_model(config), root / "slow")
    root = for_backend(root, backend, tmp_path_factory)
    env = {"FPN_MAX_BATCH_SIZE": "1", "FPN_MAX_QUEUE_SIZE": "1", "FPN_MIN_TOL": "1e-12",
           "FPN_MAX_ITER_LIMIT": "5000", **backend_env(backend)}  # fmt: skip
    server = start_server(root, tmp_path_factory.mktemp("slow") / "log", env)
    yield server
    server.stop()
