"""A checkpoint directory's files and ``config.json``, without torch (SPEC §4).

What a reader needs before (or instead of) building the model: the file names, the error type,
parsing and checking ``config.json``, and writing a file atomically. The onnxruntime backend
serves from these alone, so nothing here may import torch; :mod:`models.checkpoint` adds the
weights.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ModelConfig

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"
# config.json keys around the model config (not part of it)
METADATA_KEYS = {"format_version", "name", "training", "metrics"}


class CheckpointError(Exception):
    """A checkpoint directory cannot be read; the message names the file and the problem."""


def read_config(directory: str | Path) -> dict[str, Any]:
    """Parse and check ``config.json`` without touching the weights."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (a checkpoint directory needs {CONFIG_FILE})")
    try:
        document = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    version = document.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {version!r} is not supported "
            f"(this build reads {FORMAT_VERSION})"
        )
    for key in ("training", "metrics"):
        if not isinstance(document.get(key) or {}, dict):
            raise CheckpointError(f"{path}: {key!r} must be a JSON object")
    return document


@dataclass(frozen=True)
class CheckpointMetadata:
    """Everything in a checkpoint's ``config.json``, parsed and checked (no weights read): the one
    metadata record, whether or not the weights are loaded (``models.checkpoint.Checkpoint``
    holds one)."""

    name: str
    path: Path
    config: ModelConfig
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


def read_metadata(directory: str | Path) -> CheckpointMetadata:
    """Parse ``config.json`` into the model config and the metadata around it."""
    directory = Path(directory)
    document = read_config(directory)
    model_fields = {k: v for k, v in document.items() if k not in METADATA_KEYS}
    try:
        config = ModelConfig.from_dict(model_fields)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{directory / CONFIG_FILE}: invalid model config ({exc})") from None
    return CheckpointMetadata(
        name=str(document.get("name") or directory.name),
        path=directory,
        config=config,
        training=dict(document.get("training") or {}),
        metrics=dict(document.get("metrics") or {}),
    )


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Write ``path`` through ``write(temporary path)``, then move it into place (``os.replace``):
    a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a served checkpoint is read by other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
