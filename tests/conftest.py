"""Fixtures shared by every test package: deterministic seeding and where the datasets live."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

# Test tensors are tiny: intra-op threads only add synchronisation, and on a busy 2-core machine
# their spin-waits make a 1 ms convolution take 10 ms. Real runs keep torch's default.
torch.set_num_threads(1)


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
