"""``python -m service.protocol [OUT_DIR]``: generate the gRPC modules from the ``.proto``.

Without ``OUT_DIR`` the committed modules next to the ``.proto`` are rewritten. Needs
``grpcio-tools`` (a dev dependency, pinned so that the output is reproducible).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from . import GENERATED, PROTO


def generate(out_dir: Path) -> list[Path]:
    """Run protoc (grpcio-tools) on the ``.proto``; return the generated files in ``out_dir``."""
    from grpc_tools import protoc

    root = PROTO.parents[2]  # the repository root: modules import as service.protocol.*
    relative = PROTO.relative_to(root)
    with tempfile.TemporaryDirectory() as tmp:
        code = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{root}",
                f"--python_out={tmp}",
                f"--grpc_python_out={tmp}",
                str(relative),
            ]
        )
        if code != 0:
            raise RuntimeError(f"protoc failed ({code}) on {PROTO}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name in GENERATED:
            target = out_dir / name
            shutil.copyfile(Path(tmp) / relative.parent / name, target)
            written.append(target)
    return written


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO.parent
    for path in generate(out):
        print(path)
