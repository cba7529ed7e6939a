"""``fpn-export``'s work: build a checkpoint's graph, verify it against torch, write it.

Nothing is written when the family cannot be exported or verification fails; the file is
self-contained (weights inside) and carries the fingerprints of the checkpoint it came from.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoint import ONNX_FILE, load_checkpoint
from ..checkpoint_files import atomic_write
from .build import build_onnx
from .plan import check_exportable
from .runtime import ExportError, fingerprint
from .verify import Verification, verify


@dataclass(frozen=True)
class ExportResult:
    path: Path
    bytes: int
    family: str
    adaptive: bool
    verification: Verification

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "bytes": self.bytes,
            "family": self.family,
            "adaptive": self.adaptive,
            "verification": self.verification.to_dict(),
        }


def export_checkpoint(directory: str | Path, *, samples: int = 300, seed: int = 0) -> ExportResult:
    """Export ``directory``'s model to ``directory/model.onnx``, verified against torch first on
    ``samples`` inputs with every solver of the family."""
    import onnx

    directory = Path(directory)
    checkpoint = load_checkpoint(directory)
    model = checkpoint.model.float().eval()
    check_exportable(model)
    proto = build_onnx(model)
    for key, value in {**fingerprint(directory), "fpn.name": checkpoint.name}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    buffer = io.BytesIO()
    onnx.save_model(proto, buffer)
    data = buffer.getvalue()
    verification = verify(model, data, n=samples, seed=seed)
    if not verification.ok:
        raise ExportError(
            f"{directory / ONNX_FILE}: not written, the export does not match torch on "
            f"{verification.n} inputs: {verification.to_dict()}"
        )
    target = directory / ONNX_FILE
    atomic_write(target, lambda p: p.write_bytes(data))
    adaptive = any(s.fixed_depth is None for s in model.solvers().values())
    return ExportResult(target, len(data), model.config.family, adaptive, verification)
