"""Writing files and directories so that nothing is ever half-written.

Everything is written under a temporary name beside the target and renamed into place at the
end; a failure (or Ctrl-C) leaves the previous content, or nothing, never a partial artifact.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from flow.errors import ArtifactError


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it; set it straight back
    os.umask(mask)
    return mask


def _as_if_created_normally(path: Path, directory: bool) -> None:
    # mkstemp/mkdtemp create 0600/0700 entries; a family written by one user (a trainer
    # container) must be readable by another (the cloud service), as open() would have made it.
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_directory(target: Path | str, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces `target` when the block succeeds."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise ArtifactError(f"{target} already exists; choose another path or pass overwrite "
                            f"(--force on the command line)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        # writers differ (safetensors creates 0600 files): give everything the usual modes
        for path in [staging, *staging.rglob("*")]:
            _as_if_created_normally(path, directory=path.is_dir())
        if target.exists():
            # Rename the old one aside first so the swap is two renames, never a copy.
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, retired / target.name)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(target: Path | str) -> Iterator[Path]:
    """Yield a temporary path that is renamed onto `target` when the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    staging = Path(name)
    try:
        yield staging
        _as_if_created_normally(staging, directory=False)
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)
