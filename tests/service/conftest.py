"""Service test fixtures: MNIST, a tiny trained checkpoint, real ``fpn-serve`` processes on
loopback ports (session-scoped), and a fake backend for logic tests through the app factory."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from service_support import (
    REPO_ROOT,
    ServerProcess,
    intensities,
    launch_server,
    load_mnist,
    start_server,
    train_tiny_checkpoint,
)

from models import load_checkpoint

ADMIN_TOKEN = "test-admin-token"
BUNDLED = REPO_ROOT / "checkpoints" / "mnist-fpn"


@pytest.fixture(scope="session")
def mnist_dir(data_dir: Path) -> Path:
    if not (data_dir / "mnist" / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST not found under {data_dir} (set FPN_DATA_DIR)")
    return data_dir


@pytest.fixture(scope="session")
def mnist_test(mnist_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images (10000, 28, 28) uint8, labels (10000,))."""
    return load_mnist(mnist_dir, "test")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, mnist_dir: Path) -> Path:
    """A model directory holding one tiny trained checkpoint, ``mnist-tiny``."""
    root = tmp_path_factory.mktemp("models")
    train_tiny_checkpoint(root / "mnist-tiny", mnist_dir)
    return root


class Offline:
    """The checkpoint run in the test process: the reference the service must reproduce."""

    def __init__(self, path: Path) -> None:
        self.checkpoint = load_checkpoint(path)
        self.model = self.checkpoint.model

    def predict(self, x: np.ndarray, **knobs):
        """x: (N, 1, 28, 28) float32 in [0, 1]; knobs as ``ImplicitClassifier.predict``.
        Runs on one thread, as the test servers do."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self.model.predict(torch.from_numpy(x), **knobs)
        finally:
            torch.set_num_threads(threads)

    def alone(self, x: np.ndarray, **knobs) -> list[tuple[int, int]]:
        """(label, iterations) of every sample solved on its own (batch of one)."""
        out = []
        for row in x:
            result = self.predict(row[None], **knobs)
            out.append((int(result.logits.argmax(1)), int(result.stats.iterations[0])))
        return out


@pytest.fixture(scope="session")
def offline(model_dir: Path) -> Offline:
    return Offline(model_dir / "mnist-tiny")


@pytest.fixture(scope="session")
def digits(mnist_test) -> np.ndarray:
    """The first 256 MNIST test images as API inputs, (256, 1, 28, 28) float32."""
    return intensities(mnist_test[0][:256])


SERVERS = {
    # default batching (2 ms delay), and an admin token
    "server": {"FPN_ADMIN_TOKEN": ADMIN_TOKEN},
    # a generous queue delay (400 ms): requests sent together land in one batch
    "batching": {"FPN_MAX_QUEUE_DELAY_MS": "400", "FPN_MAX_BATCH_SIZE": "256"},
    # one sample per batch, one queued sample at most, 64 KiB bodies
    "tiny-queue": {
        "FPN_MAX_BATCH_SIZE": "1",
        "FPN_MAX_QUEUE_SIZE": "1",
        "FPN_MAX_BODY_BYTES": "65536",
    },
}


@pytest.fixture(scope="session")
def servers(model_dir: Path, tmp_path_factory) -> Iterator[dict[str, ServerProcess]]:
    """Every session server, launched at once (start-up is mostly imports: do them in parallel)."""
    launched = {
        name: launch_server(model_dir, tmp_path_factory.mktemp(name) / "fpn-serve.log", env)
        for name, env in SERVERS.items()
    }
    yield launched
    for server in launched.values():
        _stop_cleanly(server)


def _stop_cleanly(server: ServerProcess) -> None:
    code = server.stop()
    # uvicorn re-raises the SIGTERM it handled once shutdown is complete: -15 is a clean exit.
    assert code in (0, -signal.SIGTERM), f"unclean exit ({code}):\n{server.log()}"
    assert "Traceback" not in server.log(), server.log()


def _ready(servers: dict[str, ServerProcess], name: str) -> ServerProcess:
    servers[name].wait_ready()
    return servers[name]


@pytest.fixture(scope="session")
def server(servers) -> ServerProcess:
    """``fpn-serve`` with default batching (2 ms delay) and an admin token."""
    return _ready(servers, "server")


@pytest.fixture(scope="session")
def batching_server(servers) -> ServerProcess:
    """A generous queue delay (400 ms): requests sent together land in one batch."""
    return _ready(servers, "batching")


@pytest.fixture(scope="session")
def tiny_queue_server(servers) -> ServerProcess:
    """FPN_MAX_BATCH_SIZE=1, FPN_MAX_QUEUE_SIZE=1, FPN_MAX_BODY_BYTES=65536."""
    return _ready(servers, "tiny-queue")


@pytest.fixture(scope="session")
def bundled_checkpoint() -> Path:
    """The bundled ``checkpoints/mnist-fpn`` (skips until it has been trained and committed)."""
    if not (BUNDLED / "model.safetensors").is_file():
        pytest.skip("checkpoints/mnist-fpn is not there yet")
    try:
        load_checkpoint(BUNDLED)
    except Exception as exc:  # a checkpoint being written
        pytest.skip(f"checkpoints/mnist-fpn cannot be loaded yet: {exc}")
    return BUNDLED


@pytest.fixture(scope="session")
def bundled_server(bundled_checkpoint: Path, tmp_path_factory) -> Iterator[ServerProcess]:
    server = start_server(bundled_checkpoint.parent, tmp_path_factory.mktemp("bundled") / "log")
    yield server
    _stop_cleanly(server)
