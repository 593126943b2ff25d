"""Real filesystems that fail: a tiny tmpfs to fill up, and a read-only view of a folder.

Both need ``mount`` (root, or a user namespace that allows it). Where mounting is not
allowed the tests that need them are skipped with the reason; every other test of the
same module still runs. Unmounting is lazy (``umount -l``): a provider still mapping its
lock file must not keep the mount (and the test run) hanging.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def _mount(*args: str) -> None:
    result = subprocess.run(["mount", *args], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount here ({result.stderr.strip() or 'mount failed'}): needs root")


def _unmount(target: Path) -> None:
    subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)


@contextmanager
def tiny_volume(target: Path, size: str = "16k") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``target`` (created), unmounted at the end."""
    target.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(target))
    try:
        yield target
    finally:
        _unmount(target)


@contextmanager
def read_only_view(source: Path, target: Path) -> Iterator[Path]:
    """``source`` seen read-only at ``target`` (a read-only bind mount); ``source`` stays writable."""
    target.mkdir(parents=True, exist_ok=True)
    _mount("--bind", str(source), str(target))
    try:
        result = subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot make a read-only bind mount here: {result.stderr.strip()}")
        yield target
    finally:
        _unmount(target)


def fill(volume: Path) -> Path:
    """Write zeros into ``volume/filler`` until the volume is full; return the filler."""
    filler = volume / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while True:
            os.write(fd, bytes(512))
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)
    return filler
