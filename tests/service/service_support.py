"""Fixtures' helpers for the service tests: MNIST, a tiny trained checkpoint, a real server.

Kept import-light (no service imports) so that the subprocess server and the in-process tests
share them.
"""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import torch

from models import (
    ArchConfig,
    ModelConfig,
    SolverConfig,
    create_model,
    cross_entropy,
    save_checkpoint,
)
from training.data import load_idx

REPO_ROOT = Path(__file__).resolve().parents[2]


def load_mnist(data_dir: Path, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) int64) of MNIST ``split`` ("train" or "test")."""
    prefix = "t10k" if split == "test" else "train"
    root = Path(data_dir) / "mnist"
    images = load_idx(root / f"{prefix}-images-idx3-ubyte.gz")
    labels = load_idx(root / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    return images, labels


def intensities(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28) in [0, 1], what the API takes."""
    return (images.astype(np.float32) / 255.0)[:, None]


def png_base64(image: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def train_tiny_checkpoint(
    directory: Path, data_dir: Path, *, steps: int = 200, seed: int = 0
) -> Path:
    """A small MLP FPN trained for a second or two on MNIST (~90% test accuracy), saved as a
    checkpoint directory. Predictions are meaningful, and solves take well under a millisecond
    per iteration."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops: one thread is fastest, and fair to a busy machine
    try:
        return _train(directory, data_dir, steps, seed)
    finally:
        torch.set_num_threads(threads)


def _train(directory: Path, data_dir: Path, steps: int, seed: int) -> Path:
    torch.manual_seed(seed)
    images, labels = load_mnist(data_dir, "train")
    x_all = torch.from_numpy(intensities(images[:4096]))
    y_all = torch.from_numpy(labels[:4096])
    config = ModelConfig(
        family="fpn",
        arch=ArchConfig(kind="mlp", width=96, gamma=0.8),
        solver=SolverConfig(method="anderson", tol=1e-4, max_iter=50),
    )
    model = create_model(config)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, x_all.shape[0], (64,), generator=generator)
        loss = cross_entropy(model(x_all[idx], max_iter=20), y_all[idx])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    if hasattr(model, "finalize"):
        model.finalize()
    else:
        model.tighten_lipschitz()
    return save_checkpoint(model, directory, name=directory.name, training={"steps": steps})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fpn_serve_command() -> list[str]:
    """The installed console script when present, else ``python -m service``."""
    script = Path(sys.executable).parent / "fpn-serve"
    return [str(script)] if script.exists() else [sys.executable, "-m", "service"]


@dataclass
class ServerProcess:
    """A running ``fpn-serve`` on a loopback port."""

    url: str
    process: subprocess.Popen
    log_path: Path
    grpc_port: int = 0

    @property
    def grpc_url(self) -> str:
        """``host:port`` of its gRPC listener (Open Inference Protocol)."""
        return f"127.0.0.1:{self.grpc_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 90) -> None:
        """Poll /readyz until 200; raise with the server log if it exits or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"fpn-serve exited with {self.process.returncode}:\n{self.log()}"
                )
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"fpn-serve not ready after {timeout}s:\n{self.log()}")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful shutdown) and wait; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_server(
    model_dir: Path, log_path: Path, env: dict[str, str] | None = None, ready_timeout: float = 90
) -> ServerProcess:
    """Start ``fpn-serve --model-dir model_dir`` on a free port; wait until /readyz is 200."""
    server = launch_server(model_dir, log_path, env)
    server.wait_ready(ready_timeout)
    return server


def launch_server(
    model_dir: Path, log_path: Path, env: dict[str, str] | None = None
) -> ServerProcess:
    """Start ``fpn-serve --model-dir model_dir`` on a free port without waiting for it."""
    port, grpc_port = free_port(), free_port()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("FPN_")}
    # No drain by default (SIGTERM stops at once); the drain tests ask for one.
    defaults = {"FPN_NUM_THREADS": "1", "FPN_GRPC_PORT": str(grpc_port), "FPN_DRAIN_SECONDS": "0"}
    environment.update({**defaults, **(env or {})})
    log_file = log_path.open("wb")
    process = subprocess.Popen(
        [*fpn_serve_command(), "--model-dir", str(model_dir), "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning"],
        stdout=log_file, stderr=subprocess.STDOUT, env=environment, cwd=REPO_ROOT,
    )  # fmt: skip
    grpc_port = int(environment["FPN_GRPC_PORT"])
    return ServerProcess(f"http://127.0.0.1:{port}", process, log_path, grpc_port)
