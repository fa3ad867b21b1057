"""Generate the Python code of the wire protocol: `python protos/generate.py [--check]`.

protos/flow/v1/*.proto -> flow/v1/*_pb2.py, *_pb2_grpc.py, *_pb2.pyi (committed, never edited by
hand). `--check` regenerates into a temporary directory and fails if the committed files differ,
which is how CI notices a .proto edited without regenerating.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROTOS = REPO / "protos"
PACKAGE = Path("flow") / "v1"
SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")


def generate(out: Path) -> list[Path]:
    """Run protoc (grpcio-tools) on every .proto of flow.v1, writing under `out`."""
    from grpc_tools import protoc

    sources = sorted((PROTOS / PACKAGE).glob("*.proto"))
    args = ["protoc", f"-I{PROTOS}", f"--python_out={out}", f"--grpc_python_out={out}",
            f"--pyi_out={out}", *map(str, sources)]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {[s.name for s in sources]}")
    return sorted(p for p in (out / PACKAGE).iterdir() if p.name.endswith(SUFFIXES))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="fail if the committed generated code is stale")
    args = parser.parse_args()
    if not args.check:
        for path in generate(REPO):
            print(f"wrote {path.relative_to(REPO)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = [p.name for p in fresh
                 if not (REPO / PACKAGE / p.name).is_file()
                 or not filecmp.cmp(p, REPO / PACKAGE / p.name, shallow=False)]
        committed = {p.name for p in (REPO / PACKAGE).iterdir() if p.name.endswith(SUFFIXES)}
        stale += sorted(committed - {p.name for p in fresh})
    if stale:
        print(f"generated code is stale: {stale}; run `python protos/generate.py`", file=sys.stderr)
        return 1
    print("generated code is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
