"""One writer per run directory. Every command that writes into a run (train, resume, evaluate, sample,
compare, diagnose, a grid's workers) holds `run_lock(RUN)` for as long as it runs; a second writer is
refused at once with an InputError naming the holder's process id. Readers (report) take no lock.

The lock is flock(2) on the directory itself, so taking it writes nothing into the run. The kernel
drops it when its holder exits in any way, kill -9 included: a dead writer never blocks a resume.
A process may take the lock again while it holds it (a grid worker holds its run while train and
evaluate, inside, take it too); it is released when the outermost holder lets go.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import InputError

_HELD: dict[tuple[int, int], list[int]] = {}  # (device, inode) of a locked directory -> [fd, depth]
_GUARD = threading.Lock()


def holder(path: str | Path) -> int | None:
    """The id of the process holding the lock on directory `path` (from /proc/locks, where the system
    has one), or None if none is known."""
    st = os.stat(path)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for line in lines:  # "1: FLOCK  ADVISORY  WRITE 4242 fe:00:2286580 0 EOF"
        parts = line.split()
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == key and parts[4].isdigit():
            return int(parts[4])
    return None


@contextmanager
def run_lock(run: str | Path, create: bool = False) -> Iterator[Path]:
    """Hold the write lock on directory `run` inside the block (with `create`, made first if missing,
    and removed on the way out if it is still empty); an InputError if another process holds it."""
    run = Path(run)
    created = False
    if create:
        try:
            run.mkdir(parents=True)
            created = True
        except FileExistsError:  # there already, or made by another process just now: locked below
            pass
    try:
        with _locked(run):
            yield run
    finally:
        if created and run.is_dir() and not any(run.iterdir()):
            run.rmdir()


@contextmanager
def _locked(run: Path) -> Iterator[None]:
    try:
        fd = os.open(run, os.O_RDONLY | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError):
        raise InputError(f"{run} is not a pyro-vae run directory (no such directory); pass the --out "
                         "directory of a `pyro-vae train` run") from None
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino)
    with _GUARD:
        held = _HELD.get(key)
        if held is not None:  # this process holds it already
            os.close(fd)
            held[1] += 1
        else:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                pid = holder(run)
                who = f"process {pid}" if pid is not None else "another process"
                raise InputError(f"{run} is being written by {who} (another pyro-vae command); wait for it "
                                 "to end (or stop it), then run this again") from None
            _HELD[key] = [fd, 1]
    try:
        yield
    finally:
        with _GUARD:
            held = _HELD[key]
            held[1] -= 1
            if held[1] == 0:
                del _HELD[key]
                os.close(held[0])  # closing the last descriptor releases the flock
