"""Should the onnxruntime backend join the iteration-level engine? The cost of one iteration's
``f(z)`` through an exported step graph vs torch, by occupied rows, and what an engine
iteration would cost with each (the engine adds the same stepper work to either).

An engine over onnxruntime would run the family's step part (``models.onnx.parts``) once per
iteration through ``session.run`` (IO binding saves the copies, not the call), with the stepper's
state kept outside the graph. It pays only if onnxruntime evaluates ``f`` faster than torch on
the rows the engine steps. The whole-solve graph the backend serves today (one ``run`` per batch)
is timed too, per sample, against torch's batch solve.

    python bench/onnx_step.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from onnx_design import median_ms
from serve_load import REPO, load_images

from models import load_checkpoint
from models.onnx.parts import export_parts
from models.onnx.plan import plan_export
from models.onnx.runtime import onnx_session, run_onnx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--checkpoint", type=Path, default=REPO / "checkpoints" / "mnist-fpn")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) - 1))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "onnx_step.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_checkpoint(args.checkpoint).model.eval()
    plan = plan_export(model)
    step_graph = export_parts(plan, tuple(model.config.input.shape))["step"]
    step_session = onnx_session(step_graph.SerializeToString(), threads=args.threads)
    solve_session = onnx_session(args.checkpoint / "model.onnx", threads=args.threads)
    x = load_images(args.data_dir, max(args.rows))
    rows = {}
    with torch.inference_mode():
        parts = model.solve_parts()
        for n in args.rows:
            context, z0 = parts.prologue(torch.from_numpy(x[:n]))
            z_np, c_np = z0.numpy(), context.numpy()
            feeds = {"z": z_np, "qx": c_np}
            rows[n] = {
                "torch_f_ms": median_ms(lambda c=context, z=z0: parts.step(z, c), args.repeats),
                "onnxruntime_f_ms": median_ms(
                    lambda f=feeds: step_session.run(["fz"], f), args.repeats
                ),
                "torch_solve_ms_per_sample": median_ms(
                    lambda n=n: model.predict(torch.from_numpy(x[:n])), 10
                ) / n,
                "onnxruntime_solve_ms_per_sample": median_ms(
                    lambda n=n: run_onnx(solve_session, x[:n], tol=1e-4, max_iter=50), 10
                ) / n,
            }  # fmt: skip
            print(n, json.dumps(rows[n]), flush=True)
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "threads": args.threads,
            "load_average_at_start": os.getloadavg(),
        },
        "command": " ".join(sys.argv),
        "checkpoint": str(args.checkpoint.name),
        "by_rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
