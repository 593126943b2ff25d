"""Secrets from environment variables (``HMD_*``), read-only.

A path names the variable with or without the prefix: ``SECRET_KEY``,
``secret-key`` and ``HMD_SECRET_KEY`` all read ``HMD_SECRET_KEY`` (letters are
upper-cased, anything else but digits becomes ``_``). As everywhere in
Keyvault's configuration, ``HMD_X_FILE=/path`` supplies ``HMD_X`` from a file;
such files are reread when they change (see :mod:`keyvault.secrets.files`).
The environment has no history: its one version is ``"current"``.

Managed secrets get this source with the prefix ``HMD_MANAGED_`` and a guard on
``_FILE`` paths (:mod:`keyvault.secrets.managed`), so they never read one of
Keyvault's own settings.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from datetime import datetime

from .base import (
    ReadOnlySource,
    SecretNotFound,
    SecretSource,
    SecretSourceConfigurationError,
    SecretVersion,
    SecretVersionInfo,
    require_path,
)
from .files import read_text_cached

CURRENT = "current"
_UNSAFE = re.compile(r"[^A-Z0-9_]")


class EnvSource(SecretSource):
    """``HMD_*`` environment variables (and ``HMD_*_FILE`` files); writes raise ``ReadOnlySource``."""

    name = "env"
    writable = False

    def __init__(self, prefix: str = "HMD_", *, environ: Mapping[str, str] | None = None,
                 file_guard: Callable[[str], None] | None = None) -> None:
        """:param file_guard: called with a ``_FILE`` variable's path before it is read; raises to refuse it
            (managed secrets refuse Keyvault's own files, :mod:`keyvault.secrets.managed`)."""
        if not isinstance(prefix, str) or _UNSAFE.search(prefix.upper()):
            raise SecretSourceConfigurationError("the env secret source prefix must be letters, digits and _")
        self.prefix = prefix.upper()
        self._environ = os.environ if environ is None else environ
        self._file_guard = file_guard

    def __repr__(self) -> str:
        return f"<EnvSource prefix={self.prefix!r}>"

    def variable(self, path: str) -> str:
        """The environment variable that holds ``path``."""
        name = _UNSAFE.sub("_", require_path(path).upper())
        return name if name.startswith(self.prefix) else self.prefix + name

    def _lookup(self, path: str) -> tuple[str, datetime | None]:
        variable = self.variable(path)
        value = self._environ.get(variable)
        if value:
            return value, None
        file_name = self._environ.get(variable + "_FILE")
        if file_name:
            if self._file_guard is not None:
                self._file_guard(file_name)
            return read_text_cached(file_name)[0], None
        raise SecretNotFound(f"{variable} (or {variable}_FILE) is not set")

    def read(self, path: str, *, version: str | None = None) -> SecretVersion:
        if version not in (None, CURRENT):
            raise SecretNotFound(f"environment secrets have one version, {CURRENT!r}")
        value, created = self._lookup(path)
        return SecretVersion(path=path, version=CURRENT, value=value, created_at=created, current=True)

    def write(self, path: str, value: str) -> SecretVersion:
        raise ReadOnlySource(f"environment variables are read-only; set {self.variable(path)} where the process starts")

    def list_versions(self, path: str) -> list[SecretVersionInfo]:
        self._lookup(path)
        return [SecretVersionInfo(version=CURRENT, created_at=None, current=True)]

    def delete_version(self, path: str, version: str) -> None:
        raise ReadOnlySource("environment variables are read-only")

    def health_check(self) -> tuple[bool, str]:
        return True, f"environment variables {self.prefix}*"
