"""fpn-serve's implicit-depth model library: solvers, contractive operators, backprop modes,
model families and the checkpoint format. Imports neither ``training`` nor ``service``.

The names below are imported on first use (PEP 562), so that importing a torch-free module such
as :mod:`models.onnx.runtime` or :mod:`models.checkpoint_files` does not load torch: the
onnxruntime backend serves without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# name -> the submodule that defines it
_EXPORTS = {
    "Checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "CheckpointError": "checkpoint_files",
    "CheckpointMetadata": "checkpoint_files",
    "ArchConfig": "config",
    "BackpropConfig": "config",
    "InputSpec": "config",
    "ModelConfig": "config",
    "SolverConfig": "config",
    "FAMILIES": "families",
    "create_model": "families",
    "get_family": "families",
    "register_family": "families",
    "ImplicitClassifier": "implicit",
    "ImplicitOutput": "implicit",
    "cross_entropy": "implicit",
    "SOLVERS": "solvers",
    "SolverStats": "solvers",
    "anderson_solve": "solvers",
    "get_solver": "solvers",
    "picard_solve": "solvers",
}

__all__ = [
    "FAMILIES",
    "SOLVERS",
    "ArchConfig",
    "BackpropConfig",
    "Checkpoint",
    "CheckpointError",
    "CheckpointMetadata",
    "ImplicitClassifier",
    "ImplicitOutput",
    "InputSpec",
    "ModelConfig",
    "SolverConfig",
    "SolverStats",
    "anderson_solve",
    "create_model",
    "cross_entropy",
    "get_family",
    "get_solver",
    "load_checkpoint",
    "picard_solve",
    "register_family",
    "save_checkpoint",
]


def __getattr__(name: str) -> Any:
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'models' has no attribute {name!r}") from None
    return getattr(importlib.import_module(f".{module}", __name__), name)


if TYPE_CHECKING:  # pragma: no cover - what the lazy names are, for type checkers and editors
    from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from .checkpoint_files import CheckpointError, CheckpointMetadata
    from .config import ArchConfig, BackpropConfig, InputSpec, ModelConfig, SolverConfig
    from .families import FAMILIES, create_model, get_family, register_family
    from .implicit import ImplicitClassifier, ImplicitOutput, cross_entropy
    from .solvers import SOLVERS, SolverStats, anderson_solve, get_solver, picard_solve
