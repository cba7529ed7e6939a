"""The onnxruntime backend (``FPN_BACKEND=onnxruntime``): serves a checkpoint's ``model.onnx``.

The file is the one ``fpn-export --checkpoint DIR`` writes (:mod:`models.onnx`): the whole
adaptive-depth solve in one graph, with per-sample ``tol`` / ``max_iter`` and the solver as
inputs, so one ``InferenceSession.run`` answers one batch. This backend never builds the torch
model or reads the weights, and does not import torch (:mod:`models.onnx.runtime` is all it
needs); it checks that ``model.onnx`` was exported from the checkpoint's current
``model.safetensors`` and ``config.json`` (fingerprints in the file's metadata), and offers the
solvers the file records.

Execution provider: CUDA when a GPU is requested (``FPN_DEVICE=cuda[:N]``) or available
(``auto``) and onnxruntime has the CUDA provider (the ``onnxruntime-gpu`` wheel, the ``gpu``
extra), else CPU. The provider reported (as the model's ``device``: ``cuda:N`` or ``cpu``, in
``/v1/models`` and ``fpn_model_info``) is the one the session really runs on,
``InferenceSession.get_providers()[0]``, not the one asked for: onnxruntime falls back to CPU
when the CUDA provider cannot start, and an explicit ``cuda`` request then fails loudly.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from models.checkpoint_files import ONNX_FILE, CheckpointError, read_metadata
from models.onnx.runtime import (
    OUTPUTS,
    ExportError,
    check_interface,
    default_solver,
    solver_index,
    solver_names,
)

from .base import BatchRequest, BatchResult, ModelInfo, UnsupportedModel

log = logging.getLogger("fpn_serve.onnx")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
# The solve loop's batch shrinks as samples converge, so its convolutions see a new shape on most
# iterations: onnxruntime's default EXHAUSTIVE cuDNN search would benchmark every one of them
# (2.8–3.5× slower at batch 64 on an H100 than DEFAULT, which skips it; bench/onnx_cudnn_search.py).
CUDA_OPTIONS = {"cudnn_conv_algo_search": "DEFAULT"}


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise RuntimeError(
            "FPN_BACKEND=onnxruntime needs onnxruntime: install fpn-serve[onnx] (CPU) or "
            "fpn-serve[gpu] (onnxruntime-gpu, CUDA), never both"
        ) from None
    return onnxruntime


def choose_providers(device: str, available: list[str]) -> list[Any]:
    """Execution providers to ask for, in order, for ``FPN_DEVICE=device``.

    >>> choose_providers("auto", ["CPUExecutionProvider"])
    ['CPUExecutionProvider']
    >>> choose_providers("cuda:1", ["CUDAExecutionProvider", "CPUExecutionProvider"])[0]
    ('CUDAExecutionProvider', {'device_id': 1, 'cudnn_conv_algo_search': 'DEFAULT'})
    """
    if device == "cpu":
        return [CPU]
    if device == "auto":
        if CUDA not in available:
            return [CPU]
        return [(CUDA, {"device_id": 0, **CUDA_OPTIONS}), CPU]
    index = int(device.partition(":")[2] or 0)
    if CUDA not in available:
        raise RuntimeError(
            f"FPN_DEVICE={device} but this onnxruntime has no {CUDA} (available: {available}); "
            "install onnxruntime-gpu (fpn-serve[gpu]) instead of onnxruntime, or set FPN_DEVICE=cpu"
        )
    return [(CUDA, {"device_id": index, **CUDA_OPTIONS}), CPU]


class OnnxBackend:
    """Runs a checkpoint's exported ``model.onnx`` with onnxruntime (CUDA or CPU provider)."""

    name: ClassVar[str] = "onnxruntime"

    def __init__(self) -> None:
        self.session = None
        self.outputs: list[str] = []
        self.classes = 0
        self.extras: list[str] = []
        self.providers: list[str] = []
        self.metadata: dict[str, str] = {}

    def load(self, path: Path, *, device: str, num_threads: int | None) -> ModelInfo:
        path = Path(path)
        meta = read_metadata(path)
        name, config = meta.name, meta.config
        onnx_path = path / ONNX_FILE
        if not onnx_path.is_file():
            raise _missing_export(path, config)
        ort = _onnxruntime()
        wanted = choose_providers(device, ort.get_available_providers())
        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads or max(1, (os.cpu_count() or 1) - 1)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only; a provider fallback is reported below
        try:
            session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=wanted)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise CheckpointError(f"{onnx_path}: onnxruntime cannot load it ({exc})") from None
        self._check_file(path, session)
        self.providers = list(session.get_providers())
        if device.startswith("cuda") and self.providers[0] != CUDA:
            raise RuntimeError(
                f"FPN_DEVICE={device} but onnxruntime could not start {CUDA} (providers in use: "
                f"{self.providers}); check the CUDA and cuDNN libraries onnxruntime-gpu needs"
            )
        if device == "auto" and self.providers[0] != CUDA and _gpu_present():
            log.warning(
                "%s: a GPU is present but onnxruntime runs on %s (install onnxruntime-gpu, "
                "the gpu extra, to serve on CUDA)", name, self.providers[0],
            )  # fmt: skip
        self.session = session
        self.metadata = dict(session.get_modelmeta().custom_metadata_map)
        self.classes = config.num_classes
        self.outputs = [o.name for o in session.get_outputs()]
        self.extras = [o for o in self.outputs if o not in OUTPUTS]
        in_use = f"cuda:{_cuda_index(wanted)}" if self.providers[0] == CUDA else "cpu"
        log.info("%s: onnxruntime %s, providers %s", name, ort.__version__, self.providers)
        return ModelInfo(
            metadata=meta,
            solvers=solver_names(self.metadata),
            default_solver=default_solver(self.metadata, config.solver.method),
            device=in_use,
        )

    @staticmethod
    def _check_file(path: Path, session) -> None:
        metadata = session.get_modelmeta().custom_metadata_map
        try:
            check_interface(path, metadata, [i.name for i in session.get_inputs()])
        except ExportError as exc:
            raise CheckpointError(str(exc)) from None

    def predict(self, batch: BatchRequest) -> BatchResult:
        if self.session is None:
            raise RuntimeError("predict() called before load() or after unload()")
        n = batch.x.shape[0]
        feeds = {
            "x": np.ascontiguousarray(batch.x, dtype=np.float32),
            "tol": np.ascontiguousarray(batch.tol, dtype=np.float64),
            "max_iter": np.ascontiguousarray(batch.max_iter, dtype=np.int64),
            "solver": np.array(solver_index(self.metadata, batch.solver), dtype=np.int64),
        }
        if n == 0:
            return BatchResult(
                probabilities=np.zeros((0, self.classes), np.float32),
                iterations=np.zeros(0, np.int64),
                residual=np.zeros(0, np.float32),
                converged=np.zeros(0, bool),
            )
        out = dict(zip(self.outputs, self.session.run(self.outputs, feeds), strict=True))
        return BatchResult(
            probabilities=out["probabilities"],
            iterations=out["iterations"].astype(np.int64, copy=False),
            residual=out["residual"],
            converged=out["converged"].astype(bool, copy=False),
            extras={k: out[k] for k in self.extras},
        )

    def unload(self) -> None:
        self.session = None


def _cuda_index(providers: list[Any]) -> int:
    for entry in providers:
        if isinstance(entry, tuple) and entry[0] == CUDA:
            return int(entry[1].get("device_id", 0))
    return 0


def _missing_export(path: Path, config) -> CheckpointError:
    """The error for a checkpoint without ``model.onnx``: unsupported (skipped) when its family
    does not export, else a load failure that says how to export it. Only this error path asks the
    family, and so imports torch."""
    from models.onnx.plan import check_config_exportable

    try:
        check_config_exportable(config)
    except ExportError as exc:
        return UnsupportedModel(f"{path}: FPN_BACKEND=onnxruntime cannot serve it: {exc}")
    return CheckpointError(
        f"{path / ONNX_FILE}: missing; FPN_BACKEND=onnxruntime serves exported models: run "
        f"`fpn-export --checkpoint {path}` first"
    )


def _gpu_present() -> bool:
    """Whether a CUDA GPU is visible (NVIDIA's device nodes), without importing torch."""
    return Path("/dev/nvidiactl").exists() or Path("/dev/nvidia0").exists()
