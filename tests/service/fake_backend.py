"""A fake backend for logic tests: instant, deterministic, with a gate to hold solves and an
extra per-sample output (as a ``linf`` family would report ``certified_radius_linf``)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import ClassVar

import numpy as np

from models.checkpoint_files import read_metadata
from service.backends import BatchRequest, BatchResult, ModelInfo

NAN_TRIGGER = 7  # a request with max_iter=7 diverges: NaN residual, converged=false


class FakeBackend:
    """iterations = min(ceil(-log10(tol)), max_iter); label = int(10 * mean intensity) % C."""

    name: ClassVar[str] = "fake"
    gate: ClassVar[threading.Event | None] = None  # when set: every predict waits for it
    load_gate: ClassVar[threading.Event | None] = None  # when set: every load waits for it
    calls: ClassVar[list[BatchRequest]] = []

    def load(self, path: Path, *, device: str, num_threads: int | None) -> ModelInfo:
        if FakeBackend.load_gate is not None and not FakeBackend.load_gate.wait(timeout=30):
            raise TimeoutError("test load gate never opened")
        meta = read_metadata(path)
        return ModelInfo(meta, ("anderson", "picard"), meta.config.solver.method)

    def predict(self, batch: BatchRequest) -> BatchResult:
        if FakeBackend.gate is not None and not FakeBackend.gate.wait(timeout=30):
            raise TimeoutError("test gate never opened")
        FakeBackend.calls.append(batch)
        n = batch.x.shape[0]
        mean = batch.x.reshape(n, -1).mean(axis=1)
        labels = (mean * 10).astype(np.int64) % 10
        probabilities = np.full((n, 10), 0.01, dtype=np.float32)
        probabilities[np.arange(n), labels] = 0.91
        wanted = np.ceil(-np.log10(batch.tol)).astype(np.int64)
        iterations = np.minimum(wanted, batch.max_iter)
        converged = wanted <= batch.max_iter
        residual = np.where(converged, batch.tol / 2, 1.0).astype(np.float32)
        diverged = batch.max_iter == NAN_TRIGGER
        residual[diverged], converged[diverged] = np.nan, False
        return BatchResult(
            probabilities=probabilities,
            iterations=iterations,
            residual=residual,
            converged=converged,
            extras={"certified_radius_linf": (mean / 10).astype(np.float32)},
        )

    def unload(self) -> None:
        pass
