"""Late imports: a backend's SDK when a provider is built, a class named by a dotted path.

Both turn a failed import into a configuration error that says what to do
(which pip package to install, which path to fix) instead of an ``ImportError``
at start-up. Like the rest of :mod:`keyvault.kms`, no Django here (``import_string``
is Django's ``django.utils.module_loading.import_string``, with our errors).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

from .errors import ConfigurationError


def require_sdk(
    modules: Mapping[str, str],
    *,
    package: str,
    user: str,
    error: type[Exception] = ConfigurationError,
) -> SimpleNamespace:
    """Import an SDK's ``modules`` (attribute name -> dotted module) and return them as attributes.

    Call it where the provider is built, never at import time, so that Keyvault
    starts without SDKs it is not configured to use.

    :param package: what to ``pip install`` when a module is missing.
    :param user: who needs it, for the message ("the gcp KMS provider").
    :param error: the exception class to raise (a secret source raises its own).
    :raises error: a module cannot be imported.
    """
    try:
        return SimpleNamespace(**{name: importlib.import_module(path) for name, path in modules.items()})
    except ImportError as exc:
        missing = getattr(exc, "name", None) or next(iter(modules.values()))
        raise error(f"{user} needs the {package} package ({missing} missing): pip install {package}") from None


def import_string(
    dotted_path: str,
    *,
    what: str = "class",
    install_hint: str = "",
    error: type[Exception] = ConfigurationError,
) -> Any:
    """Import ``module.attribute`` named by ``dotted_path`` and return the attribute.

    :param what: what the path names, for the message ("KMS provider 'aws'").
    :param install_hint: pip package that provides the module, if it is a known one.
    :raises error: the path is malformed, its module is missing, or it has no such attribute.
    """
    module_name, _, attribute = str(dotted_path).rpartition(".")
    if not module_name or not attribute:
        raise error(f"{what}: {dotted_path!r} is not a dotted path (module.Class)")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        hint = f"pip install {install_hint}" if install_hint else f"check the class path {dotted_path!r}"
        raise error(f"{what} cannot be loaded ({exc.name} missing): {hint}") from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise error(f"{what}: no class {dotted_path!r}") from None
