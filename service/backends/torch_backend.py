"""The torch backend: ``models.load_checkpoint`` and ``ImplicitClassifier.predict``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from models import ImplicitClassifier, load_checkpoint

from .base import BatchRequest, BatchResult, ModelInfo, SolveProgram


def resolve_device(device: str) -> torch.device:
    """``auto`` -> ``cuda`` when available else ``cpu``; a missing CUDA device is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} requested but CUDA is not available")
        index = resolved.index or 0
        if index >= torch.cuda.device_count():
            raise RuntimeError(
                f"device {device!r} requested but only "
                f"{torch.cuda.device_count()} CUDA devices exist"
            )
    return resolved


def configure_threads(num_threads: int | None) -> int:
    """Set torch's intra-op threads for serving (process-wide); returns the number set.

    Default: every core but one, so the event loop (HTTP, JSON, batching) keeps a core.
    """
    threads = num_threads or max(1, (os.cpu_count() or 1) - 1)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


class TorchBackend:
    """Runs a checkpoint with torch on CPU or one CUDA device."""

    name: ClassVar[str] = "torch"

    def __init__(self) -> None:
        self.model: ImplicitClassifier | None = None
        self.device = torch.device("cpu")

    def load(self, path: Path, *, device: str, num_threads: int | None) -> ModelInfo:
        self.device = resolve_device(device)
        if self.device.type == "cpu":
            configure_threads(num_threads)
        checkpoint = load_checkpoint(path, device=self.device)
        self.model = checkpoint.model
        return ModelInfo(
            metadata=checkpoint.meta,
            solvers=tuple(self.model.solvers()),
            default_solver=self.model.default_solver(),
            device=str(self.device),
        )

    def program(self) -> SolveProgram:
        """The model's parts (spectral norms computed once, not per request) and steppers."""
        if self.model is None:
            raise RuntimeError("program() called before load() or after unload()")
        with torch.inference_mode():
            parts = self.model.solve_parts()
        dtype = next(self.model.parameters()).dtype
        return SolveProgram(parts, self.model.solvers(), self.device, dtype)

    def predict(self, batch: BatchRequest) -> BatchResult:
        if self.model is None:
            raise RuntimeError("predict() called before load() or after unload()")
        with torch.inference_mode():
            x = torch.from_numpy(batch.x).to(self.device)
            tol = torch.from_numpy(batch.tol).to(self.device)
            max_iter = torch.from_numpy(batch.max_iter).to(self.device)
            out = self.model.predict(x, tol=tol, max_iter=max_iter, solver=batch.solver)
            probabilities = torch.softmax(out.logits.float(), dim=1)
            return BatchResult(
                probabilities=_numpy(probabilities),
                iterations=_numpy(out.stats.iterations).astype(np.int64, copy=False),
                residual=_numpy(out.stats.residual),
                converged=_numpy(out.stats.converged).astype(bool, copy=False),
                extras={k: _numpy(v) for k, v in out.extras.items()},
            )

    def unload(self) -> None:
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu").numpy()
