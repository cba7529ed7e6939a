"""onnxruntime's CUDA provider: which cuDNN convolution-algorithm search suits the solve loop.

The exported solve drops converged rows from the loop state, so its convolutions see a new batch
size on most iterations. onnxruntime's default ``cudnn_conv_algo_search=EXHAUSTIVE`` benchmarks
the algorithms for every new shape; ``HEURISTIC`` asks cuDNN's heuristics and ``DEFAULT`` takes
its implicit-GEMM algorithm without a search. This times ``model.onnx`` of a checkpoint under each
setting, in process, at batches of MNIST test images (median of ``--runs`` after 5 warm-ups), and
prints the per-operator time onnxruntime's profiler reports for the service's setting at batch 64.

Needs a GPU and onnxruntime-gpu (``fpn-serve[gpu]``); the service uses the winner
(``service.backends.onnx_backend.CUDA_OPTIONS``).

    python bench/onnx_cudnn_search.py --checkpoint checkpoints/mnist-fpn --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.backends.onnx_backend import CUDA, CUDA_OPTIONS  # noqa: E402

MODES = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")


def session(onnx_path: Path, search: str, *, profile: bool = False):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_profiling = profile
    providers = [(CUDA, {"cudnn_conv_algo_search": search}), "CPUExecutionProvider"]
    s = ort.InferenceSession(str(onnx_path), sess_options=options, providers=providers)
    if s.get_providers()[0] != CUDA:
        sys.exit(f"onnxruntime did not start {CUDA}: providers {s.get_providers()}")
    return s


def feeds(images: np.ndarray, batch: int, i: int) -> dict[str, np.ndarray]:
    start = (i * batch) % (len(images) - batch)
    return {
        "x": images[start : start + batch],
        "tol": np.full(batch, 1e-4),
        "max_iter": np.full(batch, 50, dtype=np.int64),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, default=REPO / "checkpoints" / "mnist-fpn")
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    with gzip.open(args.data_dir / "mnist" / "t10k-images-idx3-ubyte.gz") as f:
        raw = f.read()
    images = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 1, 28, 28)[:2048]
    images = images.astype(np.float32) / 255.0
    onnx_path = args.checkpoint / "model.onnx"

    results: dict[str, dict[int, float]] = {}
    for mode in MODES:
        s = session(onnx_path, mode)
        results[mode] = {}
        for batch in args.batches:
            for i in range(5):
                s.run(None, feeds(images, batch, i))
            times = []
            for i in range(args.runs):
                start = time.perf_counter()
                s.run(None, feeds(images, batch, i))
                times.append(time.perf_counter() - start)
            results[mode][batch] = round(1e3 * float(np.median(times)), 2)
        print(mode, {b: f"{ms} ms" for b, ms in results[mode].items()}, flush=True)

    # Where the time goes at batch 64 under the service's setting.
    s = session(onnx_path, CUDA_OPTIONS["cudnn_conv_algo_search"], profile=True)
    for i in range(10):
        s.run(None, feeds(images, 64, i))
    by_op: dict[tuple[str, str], float] = collections.defaultdict(float)
    for event in json.loads(Path(s.end_profiling()).read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            a = event.get("args", {})
            by_op[(a.get("op_name"), a.get("provider"))] += event["dur"] / 10 / 1e3
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:12]
    for (op, provider), ms in top:
        print(f"{op:>12} {provider:<24} {ms:7.2f} ms per batch of 64")

    print("| cudnn_conv_algo_search | " + " | ".join(f"batch {b} ms" for b in args.batches) + " |")
    print("| --- | " + " | ".join("---:" for _ in args.batches) + " |")
    for mode, row in results.items():
        print(f"| {mode} | " + " | ".join(str(row[b]) for b in args.batches) + " |")
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "ms_per_batch": results,
                    "profile_batch_64": [
                        {"op": op, "provider": p, "ms": round(ms, 3)} for (op, p), ms in top
                    ],
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
