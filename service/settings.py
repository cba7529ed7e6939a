"""Typed service settings (SPEC §9): environment variables with the ``FPN_`` prefix.

Every field is read from ``FPN_<NAME>`` (``FPN_MAX_BATCH_SIZE=32``) and validated when the
settings are built, so a nonsensical deployment fails at start-up, not on the first request.

>>> Settings(max_batch_size=8, max_queue_size=64).max_batch_size
8
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .backends import BACKENDS

_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def bundled_checkpoints() -> Path:
    """``./checkpoints`` when the working directory has one, else the repository's bundled one."""
    local = Path("checkpoints")
    if local.is_dir():
        return local
    return Path(__file__).resolve().parent.parent / "checkpoints"


class Settings(BaseSettings):
    """fpn-serve settings; each field is the environment variable ``FPN_<FIELD>``."""

    model_config = SettingsConfigDict(
        env_prefix="FPN_", extra="ignore", frozen=True, use_attribute_docstrings=True
    )

    model_dir: Path = Field(default_factory=bundled_checkpoints)
    """Directory of checkpoint directories (each with ``config.json``), or one checkpoint
    directory. Every checkpoint found is loaded at start-up."""

    device: str = "auto"
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""

    backend: str = "torch"
    """Inference backend: a name in ``service.backends.BACKENDS`` (``torch``; ``onnxruntime``
    once that backend is installed)."""

    max_batch_size: int = Field(64, ge=1, le=4096)
    """Most samples in one solve; also the most samples one request may carry."""

    max_queue_delay_ms: float = Field(2.0, ge=0.0, le=10_000.0)
    """How long the oldest queued request may wait for its batch to fill before it is solved."""

    max_queue_size: int = Field(1024, ge=1)
    """Most samples waiting per model; a request that does not fit is answered 503."""

    min_tol: float = Field(1e-6, gt=0.0, le=1.0)
    """Smallest ``tol`` a request may ask for (requests may ask for ``[min_tol, 1]``)."""

    max_iter_limit: int = Field(500, ge=1, le=100_000)
    """Largest ``max_iter`` a request may ask for (requests may ask for ``[1, max_iter_limit]``)."""

    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    """Largest request body; larger bodies are answered 413 before they are parsed."""

    admin_token: SecretStr | None = None
    """Bearer token for ``POST /v1/models/{name}/reload``; unset disables the admin endpoint."""

    num_threads: int | None = Field(None, ge=1, le=1024)
    """CPU threads one solve may use (torch intra-op threads). Unset: every core but one, so the
    event loop keeps a core for HTTP and JSON (at least 1)."""

    warmup: bool = True
    """Run a few solves per model (batch 1 and ``max_batch_size``, every solver) before
    reporting ready."""

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        value = value.strip().lower()
        if not _DEVICE.match(value):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {value!r}")
        return value

    @field_validator("backend")
    @classmethod
    def _backend(cls, value: str) -> str:
        value = value.strip().lower()
        if value not in BACKENDS:
            raise ValueError(f"backend {value!r} is not available; available: {sorted(BACKENDS)}")
        return value

    @field_validator("admin_token")
    @classmethod
    def _token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            return None  # FPN_ADMIN_TOKEN="" means unset
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.max_queue_size < self.max_batch_size:
            raise ValueError(
                f"max_queue_size ({self.max_queue_size}) must be >= max_batch_size "
                f"({self.max_batch_size}): a full batch must fit in the queue"
            )
        return self
