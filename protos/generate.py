"""Regenerate tip_fed/wire/ from protos/ (needs grpcio-tools 1.81.1).

Run from the repository root: ``python protos/generate.py``. The generated modules import
each other as ``tip.v1``; this script rewrites those imports to ``tip_fed.wire.tip.v1`` so the
package works without touching ``sys.path``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "tip_fed" / "wire"


def generate(out: Path = OUT) -> list[Path]:
    """Compile every .proto under protos/ into ``out`` and fix the imports."""
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    args = ["protoc", f"-I{PROTOS}", f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}"]
    if protoc.main(args + sources) != 0:
        raise SystemExit("protoc failed")
    written = []
    for path in sorted(out.rglob("*_pb2*.py*")):
        text = path.read_text()
        fixed = re.sub(r"^from tip\.v1 import", "from tip_fed.wire.tip.v1 import", text, flags=re.M)
        path.write_text(fixed)
        written.append(path)
    for pkg in (out / "tip", out / "tip" / "v1"):
        (pkg / "__init__.py").touch()
    return written


if __name__ == "__main__":
    for p in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT):
        print(p.relative_to(ROOT) if p.is_relative_to(ROOT) else p)
