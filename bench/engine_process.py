"""The engine in a thread of the server process vs in a process of its own, measured.

vLLM V1 moved its engine core out of the API server's process (talking over ZeroMQ) so that HTTP
parsing no longer steals the interpreter from the step loop. Whether that pays here is a
measurement: on a small machine the second process also competes for the same cores, and every
request and answer crosses a socket (numpy arrays as raw frames behind a JSON header).

Two variants of the same server, side by side, rounds alternating:

- ``thread``: ``fpn-serve`` as shipped (``service.engine.Engine`` on a thread of the server);
- ``process``: the same app, each model's engine replaced by a proxy that forwards requests over
  a ZeroMQ DEALER/ROUTER pair (IPC socket) to an engine process running the same ``Engine``.

This prototype exists to measure: it forwards no cancellations and its engine metrics stay in
the engine process. HTTP load from wrk (``bench/wrk/predict.lua``), single-digit requests.

    python bench/engine_process.py --data-dir ../shared/data --duration 10 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import REPO, free_port, load_images, write_bodies, wrk

MODEL = "mnist-fpn"
PATH = f"/v1/models/{MODEL}/predict"


# --- the wire: a JSON header, then one raw frame per array ------------------------------------
def encode(header: dict, arrays: dict[str, np.ndarray]) -> list[bytes]:
    specs = [[name, a.dtype.str, list(a.shape)] for name, a in arrays.items()]
    frames = [np.ascontiguousarray(a).tobytes() for a in arrays.values()]
    return [json.dumps({**header, "arrays": specs}).encode(), *frames]


def decode(frames: list[bytes]) -> tuple[dict, dict[str, np.ndarray]]:
    header = json.loads(frames[0])
    arrays = {
        name: np.frombuffer(frame, dtype=dtype).reshape(shape)
        for (name, dtype, shape), frame in zip(header.pop("arrays"), frames[1:], strict=True)
    }
    return header, arrays


# --- the engine process -------------------------------------------------------------------------
async def exit_with_parent(parent: int) -> None:
    """End when the server process is gone: uvicorn re-raises SIGTERM after its shutdown, so the
    server dies by the signal and never reaches the ``finally`` that would stop this process."""
    while os.getppid() == parent:
        await asyncio.sleep(0.5)
    os._exit(0)


def engine_process(checkpoint: str, address: str, threads: int, capacity: int) -> None:
    """Serve one model's engine on a ZeroMQ ROUTER socket: [client, id, *request] in,
    [client, id, *result] out (:func:`encode` frames)."""
    import zmq
    import zmq.asyncio

    from service.backends.torch_backend import TorchBackend
    from service.batcher import WorkItem
    from service.engine import Engine
    from service.metrics import Metrics

    backend = TorchBackend()
    backend.load(Path(checkpoint), device="cpu", num_threads=threads)

    async def main() -> None:
        engine = Engine(
            MODEL, backend.program(), max_batch_size=capacity, max_queue_size=4096,
            metrics=Metrics(),
        )  # fmt: skip
        engine.start()
        asyncio.get_running_loop().create_task(exit_with_parent(os.getppid()))
        socket = zmq.asyncio.Context().socket(zmq.ROUTER)
        socket.bind(address)

        def reply(client: bytes, rid: bytes, future: asyncio.Future) -> None:
            r = future.result()
            header = {"queue_seconds": r.queue_seconds, "solve_seconds": r.solve_seconds,
                      "batch_id": r.batch_id, "batch_size": r.batch_size}  # fmt: skip
            arrays = {"probabilities": r.probabilities, "iterations": r.iterations,
                      "residual": r.residual, "converged": r.converged, **r.extras}  # fmt: skip
            socket.send_multipart([client, rid, *encode(header, arrays)])

        while True:
            client, rid, *frames = await socket.recv_multipart()
            header, arrays = decode(frames)
            item = WorkItem(arrays["x"], header["tol"], header["max_iter"], header["solver"],
                            header["deadline"])  # fmt: skip
            future = engine.submit(item)
            future.add_done_callback(lambda f, c=client, r=rid: reply(c, r, f))

    asyncio.run(main())


class RemoteEngine:
    """Stands in for ``service.engine.Engine`` in the server process: requests go to the engine
    process and answers come back over one DEALER socket."""

    def __init__(self, address: str) -> None:
        import zmq
        import zmq.asyncio

        self.socket = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        self.socket.connect(address)
        self.pending: dict[bytes, asyncio.Future] = {}
        self.counter = 0
        self.queued = 0
        self.receiver: asyncio.Task | None = None

    def start(self) -> None:
        self.receiver = asyncio.get_running_loop().create_task(self._receive())

    async def _receive(self) -> None:
        from service.batcher import ItemResult

        core = ("probabilities", "iterations", "residual", "converged")
        while True:
            rid, *frames = await self.socket.recv_multipart()
            header, arrays = decode(frames)
            extras = {k: v for k, v in arrays.items() if k not in core}
            result = ItemResult(**{k: arrays[k] for k in core}, extras=extras, **header)
            future = self.pending.pop(rid, None)
            if future is not None and not future.done():
                future.set_result(result)

    def submit(self, item) -> asyncio.Future:
        self.counter += 1
        rid = self.counter.to_bytes(8, "little")
        future = asyncio.get_running_loop().create_future()
        self.pending[rid] = future
        header = {"tol": item.tol, "max_iter": item.max_iter, "solver": item.solver,
                  "deadline": item.deadline}  # fmt: skip
        self.socket.send_multipart([rid, *encode(header, {"x": item.x})])
        return future

    def observe_cost(self, seconds: float, iterations: int) -> None:
        pass

    async def stop(self) -> None:
        if self.receiver is not None:
            self.receiver.cancel()


def serve(variant: str, model_dir: Path, port: int, threads: int, address: str) -> None:
    """The HTTP server for one variant (run as a subprocess of this script)."""
    import uvicorn

    from service import runtime
    from service.app import create_app
    from service.settings import Settings

    if variant == "process":
        checkpoint = str(model_dir / MODEL)
        child = multiprocessing.get_context("spawn").Process(
            target=engine_process, args=(checkpoint, address, threads, 64), daemon=True
        )
        child.start()
        runtime.ModelRuntime._make_scheduler = lambda self, backend: RemoteEngine(address)
    settings = Settings(model_dir=model_dir, num_threads=threads, grpc_port=0)
    try:
        app = create_app(settings, tune_interpreter=True)  # as fpn-serve does
        uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
    finally:
        if variant == "process":
            child.terminate()


# --- the measurement ----------------------------------------------------------------------------
def start_server(variant: str, model_dir: Path, threads: int, tmp: Path):
    import subprocess

    port = free_port()
    address = f"ipc://{tmp}/engine-{port}.sock"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("FPN_")}
    command = [sys.executable, __file__, "--serve", variant, "--model-dir", str(model_dir),
               "--port", str(port), "--threads", str(threads), "--address", address]  # fmt: skip
    process = subprocess.Popen(command, env=environment)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=1) as r:
                if r.status == 200:
                    time.sleep(2 if variant == "process" else 0)  # the engine process loads too
                    return process, url
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"{variant} server did not become ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--checkpoint", type=Path, default=REPO / "checkpoints" / MODEL)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) - 1))
    parser.add_argument(
        "--out", type=Path, default=REPO / "bench" / "results" / "engine_process.json"
    )
    parser.add_argument("--serve", choices=("thread", "process"), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.model_dir, args.port, args.threads, args.address)
        return
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install -y wrk")
    x = load_images(args.data_dir, 512)
    results: dict[str, list[dict]] = {"thread": [], "process": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        models = tmp_path / "models"
        models.mkdir()
        shutil.copytree(args.checkpoint, models / MODEL)
        bodies = write_bodies(tmp_path / "digits.jsonl", x)
        for r in range(args.rounds):
            for variant in ("thread", "process") if r % 2 == 0 else ("process", "thread"):
                process, url = start_server(variant, models, args.threads, tmp_path)
                try:
                    wrk(url, PATH, bodies, 64, max(1, args.duration // 5))  # warm up
                    results[variant].append(
                        {
                            "c64": wrk(url, PATH, bodies, 64, args.duration),
                            "c1": wrk(url, PATH, bodies, 1, args.duration),
                        }
                    )
                finally:
                    process.terminate()
                    process.wait(30)
                print(f"round {r + 1} {variant}: {json.dumps(results[variant][-1])}", flush=True)

    def median(variant: str, run: str, key: str) -> float:
        return statistics.median(r[run][key] for r in results[variant])

    summary = {
        v: {
            "c64_rps": median(v, "c64", "rps"),
            "c64_p50_ms": median(v, "c64", "p50_ms"),
            "c1_p50_ms": median(v, "c1", "p50_ms"),
        }
        for v in results
    }
    out = {
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": args.threads,
            "load_average_at_start": os.getloadavg(),
        },
        "command": " ".join(sys.argv),
        "client": "wrk -t1, bench/wrk/predict.lua",
        "summary": summary,
        "process_over_thread_c64_rps": summary["process"]["c64_rps"] / summary["thread"]["c64_rps"],
        "rounds": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
