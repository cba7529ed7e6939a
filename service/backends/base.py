"""The backend seam: what the batcher hands a backend and what it gets back.

Everything crossing this boundary is numpy, so a backend may be torch, onnxruntime or anything
else that can run a fixed-point solve with per-sample ``tol`` / ``max_iter``. Backends run on the
model's single solve thread (never on the event loop); they need not be thread-safe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import numpy as np

# The torch-free modules only: the onnxruntime backend builds on this one without torch.
from models.checkpoint_files import CheckpointError, CheckpointMetadata
from models.config import ModelConfig

if TYPE_CHECKING:  # this module stays torch-free: the onnxruntime backend imports it
    import torch

    from models.implicit import SolveParts
    from models.solvers import Stepper


class UnsupportedModel(CheckpointError):
    """A valid checkpoint that this backend cannot serve (e.g. a family it cannot run). The
    registry skips such a model, with an error in the log, instead of refusing to start."""


@dataclass(frozen=True)
class ModelInfo:
    """A loaded checkpoint as the service sees it: its one metadata record (``config.json``,
    parsed) and what the backend runs: the solvers it offers, the default one, the device."""

    metadata: CheckpointMetadata
    solvers: tuple[str, ...]  # what the model really runs
    default_solver: str
    device: str = "cpu"

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def path(self) -> Path:
        return self.metadata.path

    @property
    def config(self) -> ModelConfig:
        return self.metadata.config

    @property
    def training(self) -> dict[str, Any]:
        return self.metadata.training

    @property
    def metrics(self) -> dict[str, Any]:
        return self.metadata.metrics


@dataclass(frozen=True)
class BatchRequest:
    """One solve. Shapes: x (B, *input.shape) float32 in [0, 1]; tol (B,) float64;
    max_iter (B,) int64; one solver for the whole batch."""

    x: np.ndarray
    tol: np.ndarray
    max_iter: np.ndarray
    solver: str


@dataclass(frozen=True)
class BatchResult:
    """Per-sample results. probabilities (B, classes) float32; iterations (B,) int64;
    residual (B,) float (NaN/Inf when a sample diverged); converged (B,) bool;
    extras: family-specific outputs, each (B, ...) (e.g. ``certified_radius_linf``)."""

    probabilities: np.ndarray
    iterations: np.ndarray
    residual: np.ndarray
    converged: np.ndarray
    extras: dict[str, np.ndarray] = field(default_factory=dict)


class Backend(Protocol):
    """A runtime for one checkpoint: ``load`` once, ``predict`` many times, ``unload`` once."""

    name: ClassVar[str]

    def load(self, path: Path, *, device: str, num_threads: int | None) -> ModelInfo:
        """Load the checkpoint directory ``path`` on ``device`` (``auto``/``cpu``/``cuda[:N]``)."""
        ...

    def predict(self, batch: BatchRequest) -> BatchResult:
        """Solve one batch; samples stop independently (SPEC §5)."""
        ...

    def unload(self) -> None:
        """Release the model (memory, device buffers)."""
        ...


@dataclass(frozen=True)
class SolveProgram:
    """What the iteration-level engine runs for a model: its parts (weights prepared once) and
    its solvers' steppers, on ``device`` in ``dtype``."""

    parts: SolveParts
    steppers: dict[str, Stepper]
    device: torch.device
    dtype: torch.dtype


@runtime_checkable
class SteppedBackend(Protocol):
    """A backend whose model can be driven one solver step at a time (service.engine)."""

    def program(self) -> SolveProgram:
        """The model's parts and steppers; call again after a reload."""
        ...
