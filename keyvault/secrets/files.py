"""Secrets as files: a directory of files, Docker/Kubernetes mounted secrets, ``HMD_*_FILE``.

Layout of a directory this source manages (``HMD_SECRET_FILES_DIR``)::

    <root>/<name>                   the current value: what mounts and other programs read
    <root>/.versions/<name>/<N>     every version ever written, N = 1, 2, 3…

Both files are written atomically (a temporary file in the same folder, fsync,
``os.replace``) with mode 0600 in folders of mode 0700, under an exclusive
``flock`` on ``<root>/.versions/.lock`` so two writers never take the same N.
The current version is the highest N; a file nobody wrote through us (a
mounted secret) has the single version ``"1"``, and the first write through us
records its old content as version 1 before adding version 2.

**Reread on change.** Reads are cached by the file's identity and change
signature (device, inode, mtime in ns, size, after following symlinks), so a
rotated secret is picked up on the next read without a restart: an atomic
replace gives a new inode, and the kubelet's update of a mounted Secret (write
a new ``..<timestamp>`` folder, then swap the ``..data`` symlink that every key
links through) resolves to a different file.

Names may contain ``/`` (sub-folders) but no empty, ``.``/``..`` or hidden
(``.``-prefixed) parts, so ``..data`` and ``.versions`` are never secrets and
nothing escapes the root. One trailing newline is dropped when reading, as
``echo value > file`` adds one (the same rule as ``HMD_*_FILE`` settings).
"""

from __future__ import annotations

import errno
import fcntl
import os
import tempfile
import threading
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from .base import (
    CurrentVersionError,
    ReadOnlySource,
    SecretAccessDenied,
    SecretNotFound,
    SecretSource,
    SecretSourceConfigurationError,
    SecretSourceError,
    SecretVersion,
    SecretVersionInfo,
    require_path,
    require_value,
)

VERSIONS_DIR = ".versions"
FILE_MODE = 0o600
DIR_MODE = 0o700

_cache_lock = threading.Lock()
#: absolute path -> (change signature, text)
_cache: dict[str, tuple[tuple[int, int, int, int], str]] = {}


def _signature(stat: os.stat_result) -> tuple[int, int, int, int]:
    return (stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_size)


def read_text_cached(path: str | os.PathLike) -> tuple[str, os.stat_result]:
    """Return ``(text, stat)`` of ``path``, from the cache unless the file changed.

    Symlinks are followed, so a kubelet ``..data`` swap counts as a change.
    One trailing newline is dropped.

    :raises SecretNotFound: no such file (or it is a folder).
    :raises SecretAccessDenied: the file is not readable by us.
    """
    key = os.path.abspath(path)
    try:
        stat = os.stat(key)
        signature = _signature(stat)
        with _cache_lock:
            cached = _cache.get(key)
        if cached is not None and cached[0] == signature:
            return cached[1], stat
        with open(key, "rb") as handle:
            stat = os.fstat(handle.fileno())  # the file we actually read, if it was swapped meanwhile
            raw = handle.read()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise SecretNotFound(f"no secret file {key}") from None
    except PermissionError:
        raise SecretAccessDenied(f"secret file {key} is not readable by this process") from None
    except OSError as exc:
        raise SecretSourceError(f"cannot read secret file {key}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SecretSourceError(f"secret file {key} is not UTF-8 text") from None
    text = text.removesuffix("\n").removesuffix("\r")
    with _cache_lock:
        _cache[key] = (_signature(stat), text)
    return text, stat


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically with mode 0600 (temp file, fsync, rename, fsync folder)."""
    path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(text.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _created(stat: os.stat_result) -> datetime:
    return datetime.fromtimestamp(stat.st_mtime, tz=UTC)


class FileSource(SecretSource):
    """A folder of secret files with a version history; see the module docstring."""

    name = "file"

    def __init__(self, directory: str | os.PathLike, *, read_only: bool = False) -> None:
        if not directory:
            raise SecretSourceConfigurationError("the file secret source needs a folder: set HMD_SECRET_FILES_DIR")
        self.root = Path(directory).expanduser().absolute()
        self.read_only = bool(read_only)
        self.writable = not self.read_only

    def __repr__(self) -> str:
        return f"<FileSource {str(self.root)!r}{' read-only' if self.read_only else ''}>"

    # -- paths -------------------------------------------------------------

    def _parts(self, path: str) -> list[str]:
        require_path(path)
        parts = path.split("/")
        if any(not part or part.startswith(".") for part in parts):
            raise SecretNotFound("secret file names may not be absolute or contain empty, '.', '..' or hidden parts")
        return parts

    def _live(self, path: str) -> Path:
        return self.root.joinpath(*self._parts(path))

    def _history(self, path: str) -> Path:
        return self.root.joinpath(VERSIONS_DIR, *self._parts(path))

    def _version_numbers(self, path: str) -> list[int]:
        try:
            names = os.listdir(self._history(path))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(int(n) for n in names if n.isdigit())

    @staticmethod
    def _version_number(version: object) -> int:
        if isinstance(version, int) or (isinstance(version, str) and version.isdigit()):
            number = int(version)
            if number >= 1:
                return number
        raise SecretNotFound("file secret versions are positive integers")

    # -- the contract --------------------------------------------------------

    def read(self, path: str, *, version: str | None = None) -> SecretVersion:
        numbers = self._version_numbers(path)
        current = str(numbers[-1]) if numbers else "1"
        if version is None or (not numbers and str(version) == current):
            text, stat = read_text_cached(self._live(path))
            return SecretVersion(path=path, version=current, value=text, created_at=_created(stat), current=True)
        number = self._version_number(version)
        if number not in numbers:
            raise SecretNotFound(f"secret {path!r} has no version {number}")
        text, stat = read_text_cached(self._history(path) / str(number))
        return SecretVersion(
            path=path, version=str(number), value=text, created_at=_created(stat), current=str(number) == current
        )

    def write(self, path: str, value: str) -> SecretVersion:
        if self.read_only:
            raise ReadOnlySource(f"the file source at {self.root} is read-only")
        require_value(value)
        live, history = self._live(path), self._history(path)
        with self._errors(path), self._locked():
            numbers = self._version_numbers(path)
            if not numbers and live.is_file():
                # A file written by someone else: keep its content as version 1.
                write_atomic(history / "1", read_text_cached(live)[0])
                numbers = [1]
            number = (numbers[-1] if numbers else 0) + 1
            write_atomic(history / str(number), value)
            write_atomic(live, value)
            created = _created(os.stat(live))
        return SecretVersion(path=path, version=str(number), value=value, created_at=created, current=True)

    def list_versions(self, path: str) -> list[SecretVersionInfo]:
        numbers = self._version_numbers(path)
        if not numbers:
            _, stat = read_text_cached(self._live(path))
            return [SecretVersionInfo(version="1", created_at=_created(stat), current=True)]
        history = self._history(path)
        infos = []
        for number in numbers:
            try:
                stat = os.stat(history / str(number))
            except FileNotFoundError:  # deleted meanwhile
                continue
            infos.append(SecretVersionInfo(str(number), _created(stat), current=number == numbers[-1]))
        return infos

    def delete_version(self, path: str, version: str) -> None:
        if self.read_only:
            raise ReadOnlySource(f"the file source at {self.root} is read-only")
        number = self._version_number(version)
        with self._errors(path), self._locked():
            numbers = self._version_numbers(path)
            if number not in numbers:
                raise SecretNotFound(f"secret {path!r} has no version {number}")
            if number == numbers[-1]:
                raise CurrentVersionError(f"version {number} of {path!r} is current; write a new version first")
            (self._history(path) / str(number)).unlink()

    def health_check(self) -> tuple[bool, str]:
        if not self.root.exists() and self.writable:
            parent = next(p for p in self.root.parents if p.exists())
            if parent.is_dir() and os.access(parent, os.W_OK | os.X_OK):
                return True, f"folder {self.root} (created on the first write)"
        if not self.root.is_dir():
            return False, f"{self.root} is not a folder"
        if not os.access(self.root, os.R_OK | os.X_OK):
            return False, f"{self.root} is not readable"
        if self.writable and not os.access(self.root, os.W_OK):
            return False, f"{self.root} is not writable"
        return True, f"folder {self.root}"

    # -- helpers ---------------------------------------------------------

    @contextmanager
    def _locked(self):
        history_root = self.root / VERSIONS_DIR
        history_root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        with open(history_root / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @contextmanager
    def _errors(self, path: str):
        try:
            yield
        except PermissionError:
            raise SecretAccessDenied(f"no permission to write secret {path!r} under {self.root}") from None
        except OSError as exc:
            if exc.errno == errno.EROFS:
                raise ReadOnlySource(f"{self.root} is on a read-only file system (a mounted secret?)") from None
            raise SecretSourceError(f"cannot write secret {path!r} under {self.root}: {exc.strerror}") from None
