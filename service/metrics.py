"""Prometheus metrics (SPEC §8) in a registry owned by one app instance.

Names and label sets are part of the product contract. No label takes a request-supplied free
value: ``model`` is a loaded model's name, or ``""`` when a request names an unknown model;
``endpoint`` is one of :data:`ENDPOINTS`.

One process serves one device and owns one registry. The CLI runs exactly one uvicorn worker per
process, so no multiprocess aggregation is needed: scale by replicas, and let Prometheus
aggregate across them.
"""

from __future__ import annotations

import math

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

# SPEC §8: no ``_created`` series (nobody reads them; they double the counters' series).
disable_created_metrics()

ENDPOINTS = ("predict", "infer", "grpc_infer", "reload")
"""Values of the ``endpoint`` label: v1 predict, V2 infer over HTTP and over gRPC, admin
reload. gRPC requests are counted with the HTTP status of their outcome (200, 404, 422, 503...),
so one ``code`` label means the same thing for both protocols."""

UNKNOWN_MODEL = ""
"""``model`` label of a request whose model does not exist (never the requested name)."""

ITERATION_BUCKETS = (1, 2, 3, 5, 8, 12, 20, 30, 50, 75, 100, 150, 200, 300, 500)
RESIDUAL_BUCKETS = tuple(float(f"{10.0**e:.1g}") for e in np.arange(-8.0, 0.01, 0.5))  # 1e-8 … 1
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.075,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)

__all__ = ["CONTENT_TYPE", "ENDPOINTS", "UNKNOWN_MODEL", "Metrics"]


class Metrics:
    """Every SPEC §8 metric, registered in ``self.registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "fpn_requests_total", "Requests answered, by status code.",
            ("model", "endpoint", "code"), registry=r,
        )  # fmt: skip
        self.request_duration = Histogram(
            "fpn_request_duration_seconds", "Time from request received to response ready.",
            ("model", "endpoint"), buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_duration = Histogram(
            "fpn_queue_duration_seconds", "Time a request waited in its model's queue.",
            ("model",), buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.solve_duration = Histogram(
            "fpn_solve_duration_seconds",
            "Time of a sample in the solve, from joining to leaving it (a batch solve's time "
            "for a backend without per-iteration scheduling).",
            ("model",), buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.iterations = Histogram(
            "fpn_solver_iterations", "Solver iterations per sample.",
            ("model",), buckets=ITERATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.residual = Histogram(
            "fpn_solver_residual", "Relative residual per sample (finite residuals only).",
            ("model",), buckets=RESIDUAL_BUCKETS, registry=r,
        )  # fmt: skip
        self.nonconverged = Counter(
            "fpn_solver_nonconverged_total", "Samples that did not reach their tol.",
            ("model",), registry=r,
        )  # fmt: skip
        self.samples = Counter(
            "fpn_samples_total", "Samples solved.", ("model",), registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "fpn_batch_size", "Samples in the solve, observed at every engine iteration.",
            ("model",), buckets=BATCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.engine_active_samples = Gauge(
            "fpn_engine_active_samples", "Samples in the running solve.", ("model",), registry=r,
        )  # fmt: skip
        self.engine_iterations = Counter(
            "fpn_engine_iterations_total",
            "Solver iterations of the running solve, whatever its size.",
            ("model",), registry=r,
        )  # fmt: skip
        self.queue_depth = Gauge(
            "fpn_queue_depth", "Samples waiting in the model's queue.", ("model",), registry=r,
        )  # fmt: skip
        self.requests_cancelled = Counter(
            "fpn_requests_cancelled_total",
            "Requests cancelled by their client (HTTP disconnect, gRPC cancel): not answered.",
            ("model", "endpoint"), registry=r,
        )  # fmt: skip
        self.model_info = Gauge(
            "fpn_model_info", "A loaded model (value 1).",
            ("model", "family", "backend", "device"), registry=r,
        )  # fmt: skip

    # --- recording ----------------------------------------------------------------------------
    def observe_request(self, model: str, endpoint: str, code: int, seconds: float) -> None:
        self.requests.labels(model, endpoint, str(code)).inc()
        self.request_duration.labels(model, endpoint).observe(seconds)

    def observe_batch(
        self,
        model: str,
        *,
        solve_seconds: float,
        queue_seconds: list[float],
        iterations: np.ndarray,
        residual: np.ndarray,
        converged: np.ndarray,
    ) -> None:
        """One batch solve: its duration and size, each request's queue time, each sample's
        iterations and residual. Non-finite residuals are counted as non-converged and left out
        of the residual histogram (they would poison its sum)."""
        self.solve_duration.labels(model).observe(solve_seconds)
        self.batch_size.labels(model).observe(int(iterations.shape[0]))
        queue = self.queue_duration.labels(model)
        for seconds in queue_seconds:
            queue.observe(seconds)
        self.observe_samples(model, iterations=iterations, residual=residual, converged=converged)

    def observe_samples(
        self, model: str, *, iterations: np.ndarray, residual: np.ndarray, converged: np.ndarray
    ) -> None:
        """Samples that left the solve: their iterations and residuals. Non-finite residuals are
        counted as non-converged and left out of the residual histogram (they would poison its
        sum)."""
        n = int(iterations.shape[0])
        self.samples.labels(model).inc(n)
        hist = self.iterations.labels(model)
        for value in iterations.tolist():
            hist.observe(value)
        hist = self.residual.labels(model)
        for value in residual.tolist():
            if math.isfinite(value):
                hist.observe(value)
        failed = n - int(np.count_nonzero(converged))
        if failed:
            self.nonconverged.labels(model).inc(failed)

    def set_model(self, model: str, *, family: str, backend: str, device: str) -> None:
        self.forget_model(model)
        self.model_info.labels(model, family, backend, device).set(1)
        # Touch the per-model series so that they exist (at 0) before the first request.
        for metric in (self.nonconverged, self.samples, self.engine_iterations):
            metric.labels(model)
        for endpoint in ("predict", "infer", "grpc_infer"):
            self.requests_cancelled.labels(model, endpoint)
        self.queue_depth.labels(model).set(0)
        self.engine_active_samples.labels(model).set(0)

    def forget_model(self, model: str) -> None:
        names = ("model", "family", "backend", "device")
        for sample in next(iter(self.model_info.collect())).samples:
            if sample.labels["model"] == model:
                self.model_info.remove(*(sample.labels[k] for k in names))

    def render(self) -> bytes:
        return generate_latest(self.registry)
