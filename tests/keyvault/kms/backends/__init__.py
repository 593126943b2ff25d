"""One module per KMS backend, each giving the contract suite a running backend.

A module here defines ``NAME`` and a session-scoped pytest fixture called
``<NAME>_harness`` that yields a :class:`tests.keyvault.kms.harness.Harness`. The root
``conftest.py`` loads every module of this package as a pytest plugin, and the
contract suite runs once per backend in ``BACKEND_NAMES``.

An optional backend (one that needs something only some machines have, such as
an external server) sets ``AVAILABLE = False`` when it cannot run: it is still
loaded as a plugin, but it is left out of ``BACKEND_NAMES``, so its contract
tests are never generated (neither skipped nor failed).
"""

import importlib
import pkgutil

BACKEND_MODULES = sorted(
    f"{__name__}.{module.name}" for module in pkgutil.iter_modules(__path__) if not module.name.startswith("_")
)


def available_backend_names() -> list[str]:
    """Names of the backend modules that do not set ``AVAILABLE = False``."""
    return [
        module.rsplit(".", 1)[1]
        for module in BACKEND_MODULES
        if getattr(importlib.import_module(module), "AVAILABLE", True)
    ]


def __getattr__(name: str):
    # Computed on first use, not at import: the root conftest imports this package to list
    # the plugins, and pytest must import (and assertion-rewrite) the modules itself first.
    if name == "BACKEND_NAMES":
        return available_backend_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
