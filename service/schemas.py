"""Request and response models: native v1 and the Open Inference Protocol (KServe V2).

Tensors (``inputs``, V2 ``data``) are typed ``Any`` here on purpose: they are checked as whole
numpy arrays (shape, dtype, finiteness, range) by the handler, which is much faster than
validating 784 floats one by one. Response models document the API (OpenAPI); responses are
built as plain dicts on the hot path.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- native v1 ------------------------------------------------------------------------------------
class PredictRequest(_Strict):
    """``POST /v1/models/{name}/predict``. Exactly one of ``inputs`` and ``images``."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "oneOf": [
                {"required": ["inputs"], "properties": {"inputs": {"type": "array"}}},
                {"required": ["images"], "properties": {"images": {"type": "array"}}},
            ]
        },
    )

    inputs: list[Any] | None = Field(
        None,
        description="Raw intensities in [0, 1]: [N, C, H, W], [N, H, W] (one channel) or [N, D].",
    )
    images: list[str] | None = Field(
        None, description="Base64 PNG or JPEG images (a data: URL prefix is accepted)."
    )
    tol: float | None = Field(None, gt=0, description="Per-sample tolerance; default: the model's.")
    max_iter: int | None = Field(None, ge=1, description="Iteration cap; default: the model's.")
    solver: str | None = Field(None, description="picard or anderson; default: the model's.")
    deadline_ms: float | None = Field(
        None, gt=0, description="Latency budget: caps max_iter to what fits in the time left."
    )
    top_k: int | None = Field(None, ge=1, description="Also return the k most likely classes.")
    return_probabilities: bool = False


class ClassScore(BaseModel):
    label: int
    class_: str = Field(alias="class")
    score: float


class Prediction(BaseModel):
    """One sample. Family-specific extras (e.g. ``certified_radius_linf``) appear as more keys."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    label: int
    class_: str = Field(alias="class")
    score: float
    top_k: list[ClassScore] | None = None
    probabilities: list[float] | None = None
    iterations: int
    residual: float | None = Field(description="null when the iterate was not finite")
    converged: bool


class SolverEcho(BaseModel):
    method: str
    tol: float
    max_iter: int


class BatchInfo(BaseModel):
    id: int
    size: int = Field(description="samples in the batch solve this request was part of")


class Timing(BaseModel):
    queue: float
    solve: float
    total: float


class PredictResponse(BaseModel):
    model: str
    predictions: list[Prediction]
    solver: SolverEcho
    batch: BatchInfo
    timing_ms: Timing


class ErrorResponse(BaseModel):
    error: str = Field(description="stable machine-readable code, e.g. invalid_input")
    message: str


class Status(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    models: dict[str, str] = Field(description="model name -> ready, loading or its error")


class NotReadyResponse(Readiness):
    error: str
    message: str


class ModelSummary(BaseModel):
    name: str
    family: str | None
    device: str | None
    backend: str
    input_shape: list[int] | None
    classes: list[str] | None
    ready: bool


class ModelList(BaseModel):
    models: list[ModelSummary]


class ModelMetadata(ModelSummary):
    model_config = ConfigDict(extra="allow")

    config: dict[str, Any]
    solver_defaults: dict[str, Any]
    solvers: list[str]
    limits: dict[str, float]
    training: dict[str, Any] | None
    metrics: dict[str, Any] | None
    extra_outputs: list[str]


class ReloadResponse(BaseModel):
    model: str
    reloaded: bool
    family: str
    metrics: dict[str, Any] | None
    seconds: float


# --- Open Inference Protocol (V2) ----------------------------------------------------------------
class V2Parameters(BaseModel):
    """Request ``parameters``; other keys (e.g. ``binary_data_output``) are accepted."""

    model_config = ConfigDict(extra="allow")

    tol: float | None = Field(None, gt=0)
    max_iter: int | None = Field(None, ge=1)
    solver: str | None = None
    deadline_ms: float | None = Field(None, gt=0)
    binary_data_output: bool = False


class V2RequestInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str = Field(
        description="FP32 (raw intensities in [0, 1]) or UINT8 (pixels)",
        json_schema_extra={"enum": ["FP32", "UINT8"]},
    )
    parameters: dict[str, Any] | None = None
    data: Any = None


class V2RequestOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class V2InferenceRequest(BaseModel):
    id: str | None = None
    parameters: V2Parameters | None = None
    inputs: list[V2RequestInput] = Field(min_length=1)
    outputs: list[V2RequestOutput] | None = None


class V2ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class V2InferenceResponse(BaseModel):
    model_name: str
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[V2ResponseOutput]


class V2TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str] = []
    platform: str
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class V2Live(BaseModel):
    live: bool


class V2Ready(BaseModel):
    ready: bool
