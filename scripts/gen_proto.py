#!/usr/bin/env python3
"""Regenerate broker/_proto/ from proto/broker/v1/broker.proto.

Usage: python scripts/gen_proto.py [--out DIR]

The generated modules are flattened into one package, so the gRPC module's absolute
import of `broker.v1.broker_pb2` is rewritten to `broker._proto.broker_pb2`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = "broker/v1/broker.proto"
GENERATED = ("broker_pb2.py", "broker_pb2.pyi", "broker_pb2_grpc.py")


def generate(out: Path) -> None:
    """Write the generated modules into `out`."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        rc = protoc.main([
            "protoc",
            f"-I{ROOT / 'proto'}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            str(ROOT / "proto" / PROTO),
        ])
        if rc != 0:
            raise SystemExit(f"protoc failed with exit code {rc}")
        out.mkdir(parents=True, exist_ok=True)
        for name in GENERATED:
            text = (Path(tmp) / "broker" / "v1" / name).read_text()
            text = text.replace("from broker.v1 import broker_pb2", "from broker._proto import broker_pb2")
            (out / name).write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "broker" / "_proto")
    args = parser.parse_args()
    generate(args.out)
    init = args.out / "__init__.py"
    if not init.exists():
        init.write_text('"""Generated from proto/broker/v1/broker.proto; never edit by hand."""\n')
    print(f"generated {', '.join(GENERATED)} in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
