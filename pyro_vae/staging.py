"""All or none: a command's files (compare's, diagnose's, sample's figures) are written into a staging
folder first and moved into place only once every one of them was written, so an error half-way (a
figure that fails, a full disk, Ctrl-C) leaves the destination as it was."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_all_or_none(out: str | Path, write: Callable[[Path], list[Path]]) -> list[Path]:
    """Call write(staging) with a new folder inside `out` (made if missing; same file system, so each
    move is a rename), then move every file it returns into `out`; returns their paths there. If write
    raises (or is interrupted), the staging folder is removed and nothing in `out` has changed."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    try:
        written = [Path(path) for path in write(staging)]
        for path in written:
            if path.parent != staging:
                raise ValueError(f"{path} was written outside the staging folder {staging}")
        moved = []
        for path in written:
            os.replace(path, out / path.name)
            moved.append(out / path.name)
        return moved
    finally:
        shutil.rmtree(staging, ignore_errors=True)
