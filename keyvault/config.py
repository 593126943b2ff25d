"""Reading Keyvault's configuration: ``HMD_*`` variables, each also from a ``_FILE``.

``HMD_SECRET_KEY_FILE=/run/secrets/key`` reads the key from that file, the way
Docker and Kubernetes mount secrets. One trailing newline is dropped, since
``echo value > file`` adds one.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import environ

PREFIX = "HMD_"


class _StrippedFileMapping(environ.FileAwareMapping):
    def __getitem__(self, key):
        value = super().__getitem__(key)
        if self.env.get(key + "_FILE") and isinstance(value, str):
            value = value.removesuffix("\n").removesuffix("\r")
        return value


class Env(environ.FileAwareEnv):
    """django-environ's file-aware reader, with a trailing newline dropped from files."""

    ENVIRON = _StrippedFileMapping(cache=False)


env = Env()


def is_set(name: str) -> bool:
    """Return whether ``name`` or ``name_FILE`` is set in the environment."""
    return bool(os.environ.get(name)) or bool(os.environ.get(name + "_FILE"))


def dev_secret(data_dir: Path, filename: str, make) -> str:
    """Return a development secret stored in ``data_dir/filename``, creating it once.

    The file is created with mode 0600 and never overwritten, so every process
    (web, worker, beat, ``manage.py``) sees the same value.
    """
    path = data_dir / filename
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(make() + "\n")
    return path.read_text().strip()


def new_django_secret_key() -> str:
    """Return a fresh random value suitable for Django's ``SECRET_KEY``."""
    return secrets.token_urlsafe(50)
