"""One module per KMS backend, each giving the contract suite a running backend.

A module here defines ``NAME`` and a session-scoped pytest fixture called
``<NAME>_harness`` that yields a :class:`tests.kms.harness.Harness`. The root
``conftest.py`` loads every module of this package as a pytest plugin, and the
contract suite runs once per backend.
"""

import pkgutil

BACKEND_MODULES = sorted(
    f"{__name__}.{module.name}" for module in pkgutil.iter_modules(__path__) if not module.name.startswith("_")
)
BACKEND_NAMES = [module.rsplit(".", 1)[1] for module in BACKEND_MODULES]
