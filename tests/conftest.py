"""Fixtures shared by every test package: deterministic seeding, where the datasets live, and
the SPEC §8 metric names (the service and the deployment tests check the same contract)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

# Test tensors are tiny: intra-op threads only add synchronisation, and on a busy 2-core machine
# their spin-waits make a 1 ms convolution take 10 ms. Real runs keep torch's default.
torch.set_num_threads(1)


#: SPEC §8: the metric names are part of the product contract. name -> type.
SPEC_METRICS: dict[str, str] = {
    "fpn_requests_total": "counter",
    "fpn_request_duration_seconds": "histogram",
    "fpn_queue_duration_seconds": "histogram",
    "fpn_solve_duration_seconds": "histogram",
    "fpn_solver_iterations": "histogram",
    "fpn_solver_residual": "histogram",
    "fpn_solver_nonconverged_total": "counter",
    "fpn_samples_total": "counter",
    "fpn_batch_size": "histogram",
    "fpn_queue_depth": "gauge",
    "fpn_model_info": "gauge",
    "fpn_requests_cancelled_total": "counter",
    "fpn_engine_active_samples": "gauge",
    "fpn_engine_iterations_total": "counter",
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same RNG state, so failures reproduce."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Root of the datasets (``<root>/mnist/*.gz``, ...): ``$FPN_DATA_DIR`` or ``../shared/data``.

    Tests that need a dataset skip when its directory is missing; nothing is downloaded.
    """
    return Path(os.environ.get("FPN_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def spec_metrics() -> dict[str, str]:
    """SPEC §8 metric name -> Prometheus type."""
    return dict(SPEC_METRICS)
