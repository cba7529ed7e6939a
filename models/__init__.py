"""fpn-serve's implicit-depth model library: solvers, contractive operators, backprop modes,
model families and the checkpoint format. Imports neither ``training`` nor ``service``."""

from .checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from .config import ArchConfig, BackpropConfig, InputSpec, ModelConfig, SolverConfig
from .families import FAMILIES, create_model, get_family, register_family
from .implicit import ImplicitClassifier, ImplicitOutput, cross_entropy
from .solvers import SOLVERS, SolverStats, anderson_solve, get_solver, picard_solve

__all__ = [
    "FAMILIES",
    "SOLVERS",
    "ArchConfig",
    "BackpropConfig",
    "Checkpoint",
    "CheckpointError",
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
