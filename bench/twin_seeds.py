"""The FPN against its explicit twin over several seeds, same budget, selected on validation.

Each (family, seed) pair runs ``fpn-train`` with the README's MNIST recipe (``--epochs`` of it;
the explicit twin applies the same ``T`` exactly ``--depth`` times and trains by ordinary
backprop), the best epoch chosen on the 5,000 held-out validation images, the test split read
once at the end. Reports validation and test accuracy per run and mean ± std per family.

    python bench/twin_seeds.py --data-dir ../shared/data/mnist --epochs 1 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = ["--augment-shift", "2", "--lr", "3e-3", "--gamma", "0.8", "--tol", "1e-4",
          "--max-iter", "50", "--device", "cpu"]  # fmt: skip
FAMILIES = {
    "fpn": ["--family", "fpn", "--backprop", "jfb", "--solver", "anderson"],
    "explicit": ["--family", "explicit", "--depth", "5"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "mnist")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "twin_seeds.json")
    args = parser.parse_args()
    train = Path(sys.executable).parent / "fpn-train"
    runs: dict[str, list[dict]] = {family: [] for family in FAMILIES}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for family, flags in FAMILIES.items():
                command = [str(train), *flags, *RECIPE, "--dataset", "mnist",
                           "--data-dir", str(args.data_dir), "--epochs", str(args.epochs),
                           "--seed", str(seed), "--out", f"{tmp}/{family}-{seed}",
                           "--json"]  # fmt: skip
                out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
                summary = json.loads(out.strip().splitlines()[-1])
                run = {"seed": seed, **{k: summary[k] for k in ("val_accuracy", "test_accuracy")}}
                runs[family].append(run)
                print(family, json.dumps(run), flush=True)

    def spread(family: str, key: str) -> dict[str, float]:
        values = [r[key] for r in runs[family]]
        return {"mean": statistics.mean(values), "std": statistics.stdev(values)}

    result = {
        "machine": {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()},
        "command": " ".join(sys.argv),
        "recipe": RECIPE,
        "epochs": args.epochs,
        "runs": runs,
        "summary": {f: {k: spread(f, k) for k in ("val_accuracy", "test_accuracy")} for f in runs},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
