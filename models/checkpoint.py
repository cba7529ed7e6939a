"""The one checkpoint module (SPEC §4), used by training, evaluation, export and the service.

A checkpoint is a directory::

    config.json        format_version, name, family, arch, input, classes, solver, backprop,
                       training {...}, metrics {...}
    model.safetensors  weights only (safetensors: no code, no pickle)
    model.onnx         optional, written by fpn-export

Files are written to a temporary name and moved into place with ``os.replace``, so a reader never
sees half a checkpoint. Every failure to load names the file and the problem. The torch-free part
(file names, ``config.json``) lives in :mod:`models.checkpoint_files`; it is re-exported here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .checkpoint_files import (
    CONFIG_FILE,
    FORMAT_VERSION,
    ONNX_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    CheckpointMetadata,
    atomic_write,
    read_config,
    read_metadata,
)
from .config import ModelConfig
from .families import create_model
from .implicit import ImplicitClassifier

__all__ = [
    "CONFIG_FILE",
    "FORMAT_VERSION",
    "ONNX_FILE",
    "WEIGHTS_FILE",
    "Checkpoint",
    "CheckpointError",
    "CheckpointMetadata",
    "load_checkpoint",
    "read_config",
    "read_metadata",
    "save_checkpoint",
]


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (eval mode) and its metadata record."""

    model: ImplicitClassifier
    meta: CheckpointMetadata

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def path(self) -> Path:
        return self.meta.path

    @property
    def config(self) -> ModelConfig:
        """The model's config: ``meta.config`` with the family's option defaults filled in."""
        return self.model.config

    @property
    def training(self) -> dict[str, Any]:
        return self.meta.training

    @property
    def metrics(self) -> dict[str, Any]:
        return self.meta.metrics


def save_checkpoint(
    model: ImplicitClassifier,
    directory: str | Path,
    *,
    name: str | None = None,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    document = {
        "format_version": FORMAT_VERSION,
        "name": name or directory.name,
        **model.config.to_dict(),
        "training": training or {},
        "metrics": metrics or {},
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(tensors, str(p)))
    atomic_write(
        directory / CONFIG_FILE,
        lambda p: p.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n"),
    )
    return directory


def load_checkpoint(directory: str | Path, *, device: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the model from ``config.json`` and load ``model.safetensors`` into it (eval mode)."""
    directory = Path(directory)
    meta = read_metadata(directory)
    try:
        model = create_model(meta.config)
    except (TypeError, ValueError, RuntimeError) as exc:  # RuntimeError: torch rejects a shape
        raise CheckpointError(f"{directory / CONFIG_FILE}: invalid model config ({exc})") from None

    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path}: missing (weights are stored as {WEIGHTS_FILE})")
    try:
        tensors = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights_path}: unreadable or truncated ({exc})") from None
    _check_tensors(model, tensors, weights_path)
    model.load_state_dict(tensors, strict=True)
    model.to(device).eval()
    return Checkpoint(model=model, meta=meta)


def _check_tensors(model: ImplicitClassifier, tensors: dict[str, torch.Tensor], path: Path) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    problems = []
    if missing := sorted(set(expected) - set(found)):
        problems.append(f"missing tensors {missing}")
    if unexpected := sorted(set(found) - set(expected)):
        problems.append(f"unexpected tensors {unexpected}")
    problems += [
        f"{k} has shape {found[k]}, config expects {expected[k]}"
        for k in sorted(set(found) & set(expected))
        if found[k] != expected[k]
    ]
    if problems:
        raise CheckpointError(f"{path}: does not match {CONFIG_FILE}: " + "; ".join(problems))
