"""What serving an exported ``model.onnx`` needs, without torch: the file's interface, its
metadata, the freshness check against the checkpoint, and running it with onnxruntime.

The onnxruntime backend (``service/backends/onnx_backend.py``) imports only this module from the
export package, so a server on that backend never loads torch. The interface::

    inputs   x         float32 (B, *input.shape)  raw intensities in [0, 1]
             tol       float64 (B,)               per-sample tolerance
             max_iter  int64   (B,)               per-sample iteration budget
             solver    int64   ()                 index into the names in ``fpn.solvers``;
                                                  optional, defaults to the family's default
    outputs  logits         float32 (B, classes)
             probabilities  float32 (B, classes)  softmax of the logits
             iterations     int64   (B,)          applications of T per sample
             residual       float32 (B,)          SPEC §5 relative residual (NaN when diverged)
             converged      bool    (B,)
             <extras>       family outputs, e.g. certified_radius_linf float32 (B,)

onnxruntime is imported by the functions that run a graph, not by this module.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint_files import CONFIG_FILE, ONNX_FILE, WEIGHTS_FILE

EXPORT_VERSION = 1
INPUTS = ("x", "tol", "max_iter", "solver")
OUTPUTS = ("logits", "probabilities", "iterations", "residual", "converged")

# Metadata keys (``fpn.*`` model properties) a runtime reads.
VERSION_KEY = "fpn.export_version"
SOLVERS_KEY = "fpn.solvers"  # the family's solver names, comma-separated, in ``solver`` order
DEFAULT_SOLVER_KEY = "fpn.default_solver"  # the one a run without ``solver`` uses
EXTRAS_KEY = "fpn.extras"
WEIGHTS_KEY = "fpn.weights_sha256"
CONFIG_KEY = "fpn.config_sha256"


class ExportError(Exception):
    """The checkpoint cannot be exported, the export does not match torch, or an exported file
    does not fit its checkpoint any more."""


def solver_names(metadata: Mapping[str, str]) -> tuple[str, ...]:
    """The solver names of an exported file, in the order of its ``solver`` input."""
    return tuple(name for name in metadata.get(SOLVERS_KEY, "").split(",") if name)


def default_solver(metadata: Mapping[str, str], configured: str) -> str:
    """The solver a run without a ``solver`` input uses: the one recorded at export. Files
    exported before it was recorded defaulted to the configured method when offered, else to
    their last solver."""
    names = solver_names(metadata)
    recorded = metadata.get(DEFAULT_SOLVER_KEY)
    if recorded in names:
        return recorded
    return configured if configured in names else names[-1]


def solver_index(metadata: Mapping[str, str], solver: str) -> int:
    """The ``solver`` input that selects ``solver``; an unknown name lists the offered ones."""
    names = solver_names(metadata)
    if solver not in names:
        raise ValueError(f"unknown solver {solver!r}; available: {sorted(names)}")
    return names.index(solver)


# --- freshness --------------------------------------------------------------------------------
def fingerprint(directory: str | Path) -> dict[str, str]:
    """sha256 of the weights file and of the model part of ``config.json`` (what the graph
    depends on; names, training notes and metrics may change without making it stale)."""
    directory = Path(directory)
    document = json.loads((directory / CONFIG_FILE).read_text())
    model_part = {k: v for k, v in document.items() if k not in ("name", "training", "metrics")}
    return {
        WEIGHTS_KEY: _sha256((directory / WEIGHTS_FILE).read_bytes()),
        CONFIG_KEY: _sha256(json.dumps(model_part, sort_keys=True).encode()),
    }


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_fresh(directory: str | Path, metadata: Mapping[str, str]) -> None:
    """Raise :class:`ExportError` when ``model.onnx`` was exported from other weights or config."""
    directory = Path(directory)
    stale = [k for k, v in fingerprint(directory).items() if metadata.get(k) != v]
    if stale:
        what = " and ".join(WEIGHTS_FILE if k == WEIGHTS_KEY else CONFIG_FILE for k in stale)
        raise ExportError(
            f"{directory / ONNX_FILE}: stale, {what} changed since it was exported; "
            f"run `fpn-export --checkpoint {directory}` again"
        )


def check_interface(directory: str | Path, metadata: Mapping[str, str], inputs: list[str]) -> None:
    """Raise :class:`ExportError` when a loaded file is of another export version, has other
    inputs than :data:`INPUTS`, or no longer matches the checkpoint (:func:`check_fresh`)."""
    path = Path(directory) / ONNX_FILE
    version = metadata.get(VERSION_KEY)
    if version != str(EXPORT_VERSION):
        raise ExportError(
            f"{path}: export version {version!r}, this build serves {EXPORT_VERSION}; "
            f"run `fpn-export --checkpoint {directory}` again"
        )
    if inputs[: len(INPUTS) - 1] != list(INPUTS[:-1]):  # ``solver`` may be folded away
        raise ExportError(f"{path}: inputs {inputs}, expected {list(INPUTS)}")
    check_fresh(directory, metadata)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``fpn.*`` metadata of an exported file (the graph is not loaded into a runtime)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


# --- running --------------------------------------------------------------------------------
def onnx_session(
    model: str | Path | bytes, *, threads: int = 1, providers: list[Any] | None = None
) -> Any:
    """An onnxruntime ``InferenceSession`` for an exported model (CPU unless ``providers`` says
    otherwise), quiet below errors."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    source = str(model) if isinstance(model, Path | str) else model
    return ort.InferenceSession(
        source, sess_options=options, providers=providers or ["CPUExecutionProvider"]
    )


def feeds(
    metadata: Mapping[str, str], x: np.ndarray, *, tol: Any, max_iter: Any, solver: str | None
) -> dict[str, np.ndarray]:
    """The inputs of one run: ``tol`` / ``max_iter`` scalar or per sample; ``solver`` None for
    the file's default."""
    n = x.shape[0]
    fed = {
        "x": np.ascontiguousarray(x, dtype=np.float32),
        "tol": np.broadcast_to(np.asarray(tol, np.float64), (n,)).copy(),
        "max_iter": np.broadcast_to(np.asarray(max_iter, np.int64), (n,)).copy(),
    }
    if solver is not None:
        fed["solver"] = np.array(solver_index(metadata, solver), np.int64)
    return fed


def run_onnx(
    session: Any, x: np.ndarray, *, tol: Any, max_iter: Any, solver: str | None = None
) -> dict[str, np.ndarray]:
    """Run an exported model on ``x``; returns its outputs by name (numpy)."""
    metadata = session.get_modelmeta().custom_metadata_map
    names = [o.name for o in session.get_outputs()]
    fed = feeds(metadata, x, tol=tol, max_iter=max_iter, solver=solver)
    return dict(zip(names, session.run(names, fed), strict=True))
