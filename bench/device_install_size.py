"""What a device installs: the size of the `[device]` extra, and proof that it generates.

Creates a fresh virtual environment, installs familial-flow with only the `[device]` extra (no
torch), measures the installed size per distribution, then runs `DeviceClient(...).complete` on
a family's member inside it with torch absent. Needs the package index (or a pip cache) for the
install; nothing at run time.

    python bench/device_install_size.py --family runs/smollm2/family
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, write_json

GENERATE = """
import sys, json
from device import DeviceClient
result = DeviceClient(sys.argv[1], exit=0).complete("def main():", max_new_tokens=16, ignore_eos=True)
print(json.dumps({"tokens": len(result.tokens), "torch_imported": "torch" in sys.modules,
                  "text": result.text}))
"""


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def site_packages(venv: Path) -> Path:
    return next(venv.glob("lib/python*/site-packages"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", type=Path, required=True,
                        help="family directory with members/0/device.onnx and tokenizer.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="device-extra-") as tmp:
        venv = Path(tmp) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        began = time.perf_counter()
        subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "--quiet",
                        f"{REPO}[device]"], check=True)
        install_s = time.perf_counter() - began
        packages = site_packages(venv)
        sizes = {}
        for child in packages.iterdir():
            if child.is_dir() and not child.name.endswith((".dist-info", "__pycache__")):
                sizes[child.name] = directory_bytes(child)
        total = directory_bytes(packages)
        pip_own = sum(v for k, v in sizes.items() if k in ("pip", "setuptools", "_distutils_hack"))
        has_torch = (packages / "torch").exists()
        run = subprocess.run([venv / "bin" / "python", "-c", GENERATE, str(args.family.resolve())],
                             capture_output=True, text=True, cwd=tmp, check=True)
    import json

    generation = json.loads(run.stdout.strip().splitlines()[-1])
    result = {"site_packages_mb": round(total / 2**20, 1),
              "without_pip_mb": round((total - pip_own) / 2**20, 1),
              "largest_mb": {k: round(v / 2**20, 1) for k, v in
                             sorted(sizes.items(), key=lambda kv: -kv[1])[:8]},
              "torch_installed": has_torch, "install_s": round(install_s, 1),
              "generation": generation}
    print(f"[device] extra: {result['without_pip_mb']} MB installed (site-packages "
          f"{result['site_packages_mb']} MB incl. pip), torch installed: {has_torch}")
    for name, mb in result["largest_mb"].items():
        print(f"  {name:24s} {mb:8.1f} MB")
    print(f"generated {generation['tokens']} tokens without torch "
          f"(torch imported: {generation['torch_imported']})")
    print(f"wrote {write_json('device_install_size', result)}")


if __name__ == "__main__":
    main()
