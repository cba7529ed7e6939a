"""Typed service settings (SPEC §9): environment variables with the ``FPN_`` prefix.

Every field is read from ``FPN_<NAME>`` (``FPN_MAX_BATCH_SIZE=32``) and validated when the
settings are built, so a nonsensical deployment fails at start-up, not on the first request.

>>> Settings(max_batch_size=8, max_queue_size=64).max_batch_size
8
"""

from __future__ import annotations

import re
from dataclasses import dataclass
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

    grpc_port: int = Field(8001, ge=0, le=65535)
    """TCP port of the Open Inference Protocol over gRPC (``inference.GRPCInferenceService``),
    served by the same process as HTTP; 0 turns gRPC off."""

    grpc_host: str | None = None
    """Interface gRPC listens on; unset: the HTTP server's (``fpn-serve --host``)."""

    drain_seconds: float = Field(5.0, ge=0.0, le=3600.0)
    """After SIGTERM: how long ``/readyz`` and V2 readiness answer not-ready and responses carry
    ``Connection: close`` while the listeners stay open, before they close and what was
    accepted is finished."""

    gc_threshold: int = Field(100_000, ge=1)
    """Net allocations of container objects between the garbage collector's young-generation
    passes (CPython's default: 700). Start-up objects are frozen out of its view as well
    (``service/interpreter.py``)."""

    gil_switch_interval_ms: float = Field(0.5, gt=0.0, le=100.0)
    """How long a thread may keep the GIL while another waits for it (CPython's default: 5 ms).
    The solve engine's thread needs it back after every torch op."""

    warmup: bool = True
    """Run a few solves per model (batch 1 and ``max_batch_size``, every solver) before
    reporting ready."""

    @property
    def limits(self) -> Limits:
        """The request limits these settings impose."""
        return Limits(
            min_tol=self.min_tol,
            max_tol=1.0,
            max_iter_limit=self.max_iter_limit,
            max_batch_size=self.max_batch_size,
            max_body_bytes=self.max_body_bytes,
        )

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


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; every check (HTTP, gRPC, start-up) and the model metadata
    read them from here.

    >>> Limits(1e-6, 1.0, 500, 64, 1024).as_dict()["max_iter_limit"]
    500
    """

    min_tol: float
    max_tol: float
    max_iter_limit: int
    max_batch_size: int
    max_body_bytes: int

    def as_dict(self) -> dict[str, float | int]:
        return {
            "min_tol": self.min_tol,
            "max_tol": self.max_tol,
            "max_iter_limit": self.max_iter_limit,
            "max_batch_size": self.max_batch_size,
            "max_body_bytes": self.max_body_bytes,
        }

    def tol_problem(self, tol: float) -> str | None:
        """Why ``tol`` is not allowed, or None."""
        if self.min_tol <= tol <= self.max_tol:
            return None
        return f"tol {tol:g} is outside [{self.min_tol:g}, {self.max_tol:g}] (FPN_MIN_TOL)"

    def max_iter_problem(self, max_iter: int) -> str | None:
        """Why ``max_iter`` is not allowed, or None."""
        if 1 <= max_iter <= self.max_iter_limit:
            return None
        return f"max_iter {max_iter} is outside [1, {self.max_iter_limit}] (FPN_MAX_ITER_LIMIT)"

    def batch_problem(self, n: int) -> str | None:
        """Why a request of ``n`` samples is not allowed, or None."""
        if n <= self.max_batch_size:
            return None
        return (
            f"{n} samples in one request; at most {self.max_batch_size} "
            "(FPN_MAX_BATCH_SIZE): split the request"
        )
