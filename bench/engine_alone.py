"""The engine alone, without HTTP: closed-loop clients of one digit each submit straight to
``service.engine.Engine`` in this process, against ``model.predict`` at batch 1 and 64.

What the scheduler itself costs or gains, apart from the server around it (JSON, the event
loop, the client on the same cores). To compare revisions, put another tree first on the path:

    python bench/engine_alone.py --data-dir ../shared/data
    git worktree add /tmp/prev 912d4e1
    PYTHONPATH=/tmp/prev python bench/engine_alone.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(1, str(Path(__file__).resolve().parent))  # after PYTHONPATH's tree
from serve_load import REPO, load_images

MODEL = "mnist-fpn"


async def closed_loop(program, x, clients: int, seconds: float) -> dict:
    from service.batcher import WorkItem
    from service.engine import Engine
    from service.metrics import Metrics

    engine = Engine(MODEL, program, max_batch_size=64, max_queue_size=1024, metrics=Metrics())
    engine.start()
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def client(k: int) -> None:
        i = k
        while time.perf_counter() < stop:
            start = time.perf_counter()
            await engine.submit(WorkItem(x[i % len(x)][None], 1e-4, 50, "anderson"))
            latencies.append(time.perf_counter() - start)
            i += clients

    await asyncio.gather(*(client(k) for k in range(clients)))
    await engine.stop()
    return {
        "requests_per_s": len(latencies) / seconds,
        "p50_ms": statistics.median(latencies) * 1e3,
        "iterations": engine.iterations,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--checkpoint", type=Path, default=REPO / "checkpoints" / MODEL)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()

    import torch

    import service
    from service.backends.torch_backend import TorchBackend

    backend = TorchBackend()
    backend.load(args.checkpoint, device="cpu", num_threads=args.threads)
    assert backend.model is not None
    x = load_images(args.data_dir, 512)
    xt = torch.from_numpy(x)
    in_process = {}
    with torch.inference_mode():
        for batch, repeats in ((1, 300), (64, 30)):
            backend.model.predict(xt[:batch])
            times = []
            for r in range(repeats):
                rows = xt[(r * batch) % 448 :][:batch]
                start = time.perf_counter()
                backend.model.predict(rows)
                times.append(time.perf_counter() - start)
            in_process[f"batch{batch}_p50_ms"] = statistics.median(times) * 1e3
            in_process[f"batch{batch}_samples_per_s"] = batch / statistics.median(times)
    engine = {
        f"c{c}": asyncio.run(closed_loop(backend.program(), x, c, args.seconds)) for c in (1, 64)
    }
    result = {
        "service_from": str(Path(service.__file__).resolve().parent.parent),
        "torch_threads": args.threads,
        "load_average_at_start": os.getloadavg(),
        "in_process": in_process,
        "engine": engine,
        "c64_over_batch64": engine["c64"]["requests_per_s"] / in_process["batch64_samples_per_s"],
        "c1_added_ms": engine["c1"]["p50_ms"] - in_process["batch1_p50_ms"],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
