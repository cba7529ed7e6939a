"""Inference backends by name, as a small registry: ``FPN_BACKEND`` picks one.

A backend runs one checkpoint on one device behind the :class:`~service.backends.base.Backend`
protocol (``load`` / ``predict`` / ``unload``). Entries are ``"module:Class"`` strings so that a
backend's heavy imports (onnxruntime, ...) happen only when it is selected. A new backend adds
one line here::

    BACKENDS["onnxruntime"] = "service.backends.onnx_backend:OnnxBackend"
"""

from __future__ import annotations

import importlib

from .base import (
    Backend,
    BatchRequest,
    BatchResult,
    ModelInfo,
    SolveProgram,
    SteppedBackend,
    UnsupportedModel,
)

BACKENDS: dict[str, str | type] = {
    "torch": "service.backends.torch_backend:TorchBackend",
    "onnxruntime": "service.backends.onnx_backend:OnnxBackend",
}


def get_backend(name: str) -> type[Backend]:
    """The backend class registered as ``name`` (imported on first use)."""
    try:
        entry = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; available: {sorted(BACKENDS)}") from None
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = getattr(importlib.import_module(module), attr)
    return entry


__all__ = [
    "BACKENDS",
    "Backend",
    "BatchRequest",
    "BatchResult",
    "ModelInfo",
    "SolveProgram",
    "SteppedBackend",
    "UnsupportedModel",
    "get_backend",
]
