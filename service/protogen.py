"""Generates the Python protobuf/gRPC code for protos/ into service/proto_gen/.

    python -m service.protogen            # regenerate (commit the result)

The generated files are committed; tests/test_protos.py regenerates them into a scratch
directory and fails on any difference, so the committed code never drifts from the .proto.
grpc_tools (the ``dev`` extra) is needed only here.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO / "protos"
OUT = REPO / "service" / "proto_gen"
PACKAGE = "service.proto_gen"


def generate(out: Path = OUT) -> list[Path]:
    """Runs protoc on every .proto under protos/ and writes the modules under out/."""
    from grpc_tools import protoc  # dev-only dependency

    protos = sorted(p.relative_to(PROTO_ROOT) for p in PROTO_ROOT.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        include = Path(protoc.__file__).parent / "_proto"
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *map(str, protos),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        written = []
        for src in sorted(Path(tmp).rglob("*.py*")):
            rel = src.relative_to(tmp)
            text = src.read_text(encoding="utf-8")
            # protoc writes absolute imports from the proto root; ours live under PACKAGE.
            for proto in protos:
                mod = ".".join(proto.with_suffix("").parts[:-1])
                text = text.replace(f"from {mod} import", f"from {PACKAGE}.{mod} import")
            dst = out / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(text, encoding="utf-8")
            written.append(dst)
        for d in {p.parent for p in written} | {out}:
            d.mkdir(parents=True, exist_ok=True)
            init = d / "__init__.py"
            if not init.exists():
                init.write_text("")
            written.append(init)
    return sorted(set(written))


def main() -> int:
    if OUT.exists():
        shutil.rmtree(OUT)
    for path in generate():
        print(path.relative_to(REPO))
    return 0


if __name__ == "__main__":
    sys.exit(main())
