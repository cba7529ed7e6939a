"""``fpn-export --checkpoint DIR`` (SPEC §3): write ``DIR/model.onnx``, checked against torch.

Exit codes: 0 written; 1 the family cannot be exported or the export does not match torch
(nothing written); 2 bad arguments or an unreadable checkpoint; 3 onnx / onnxruntime missing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, help="Export a checkpoint to ONNX (model.onnx).")


@app.command()
def fpn_export(
    checkpoint: Annotated[Path, typer.Option(help="checkpoint directory to export")],
    samples: Annotated[int, typer.Option(min=1, help="inputs compared with torch")] = 300,
    seed: Annotated[int, typer.Option(help="seed of the comparison inputs")] = 0,
    json_output: Annotated[bool, typer.Option("--json", help="print one JSON summary")] = False,
) -> None:
    """Export the checkpoint's whole adaptive-depth solve to DIR/model.onnx (weights inside),
    after checking it against torch on SAMPLES inputs with every solver."""
    import torch

    from ..checkpoint_files import CheckpointError
    from .export import export_checkpoint
    from .runtime import ExportError

    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        typer.echo(f"fpn-export: {exc.name} is missing: install fpn-serve[onnx]", err=True)
        raise typer.Exit(3) from None
    torch.set_num_threads(1)  # the comparison solves small batches; one thread is fastest
    try:
        result = export_checkpoint(checkpoint, samples=samples, seed=seed)
    except CheckpointError as exc:
        typer.echo(f"fpn-export: {exc}", err=True)
        raise typer.Exit(2) from None
    except ExportError as exc:
        typer.echo(f"fpn-export: {exc}", err=True)
        raise typer.Exit(1) from None
    if json_output:
        typer.echo(json.dumps(result.to_dict()))
        return
    v = result.verification
    depth = "adaptive depth" if result.adaptive else "fixed depth"
    typer.echo(
        f"wrote {result.path} ({result.bytes / 1024:.0f} KiB, {result.family}, {depth}); "
        f"matches torch on {v.n} inputs x {len(v.solvers)} solver(s): max |Δp| "
        f"{v.max_probability_diff:.1e}, max |Δiterations| {v.max_iteration_diff}, "
        f"{v.label_mismatches} label differences"
    )


if __name__ == "__main__":  # pragma: no cover
    app()
