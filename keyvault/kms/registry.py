"""Provider registry: names to classes, instances built once from configuration.

The KMS layer imports nothing from Django. The Django app installs a config
loader (``set_config_loader``) that reads ``settings.KMS`` and calls
:func:`reset_providers` on ``setting_changed``, the way ``django.contrib.auth``
caches its hashers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from .base import KMSProvider
from .options import EnvReader
from .errors import ConfigurationError
from .loading import import_string
from .metrics import instrument

#: Built-in providers: registry name -> (dotted class path, pip package of its SDK).
BUILTIN_PROVIDERS: dict[str, tuple[str, str | None]] = {
    "local": ("keyvault.kms.local.LocalKMSProvider", None),
    "aws": ("keyvault.kms.aws.AWSKMSProvider", "boto3"),
    "gcp": ("keyvault.kms.gcp.GCPKMSProvider", "google-cloud-kms"),
    "vault": ("keyvault.kms.vault.VaultTransitProvider", "hvac"),
    "pkcs11": ("keyvault.kms.pkcs11.PKCS11Provider", "python-pkcs11"),
}

ConfigLoader = Callable[[], dict]

_lock = threading.Lock()
_instances: dict[str, KMSProvider] = {}
_config_loader: ConfigLoader = lambda: {"default": "local", "providers": {}}  # noqa: E731


def set_config_loader(loader: ConfigLoader) -> None:
    """Install the callable returning ``{"default": name, "providers": {name: options}}``."""
    global _config_loader
    _config_loader = loader
    reset_providers()


def reset_providers(**_signal_kwargs) -> None:
    """Forget every built provider (connected to Django's ``setting_changed``)."""
    with _lock:
        _instances.clear()


def provider_names() -> list[str]:
    """Return the names of the providers that are configured."""
    config = _config_loader()
    return sorted(config.get("providers", {}))


def default_provider_name() -> str:
    """Return the name of the provider used when none is named."""
    return _config_loader().get("default") or "local"


def load_provider_class(name: str, dotted_path: str | None = None) -> type[KMSProvider]:
    """Import the class for provider ``name``.

    :raises ConfigurationError: unknown name, or its SDK is not installed.
    """
    path, package = BUILTIN_PROVIDERS.get(name, (dotted_path, None))
    path = dotted_path or path
    if not path:
        known = ", ".join(sorted(BUILTIN_PROVIDERS))
        raise ConfigurationError(f"unknown KMS provider {name!r}; set HMD_KMS_PROVIDER to one of: {known}")
    return import_string(path, what=f"KMS provider {name!r}", install_hint=package or "")


def providers_from_env(
    env: EnvReader,
    *,
    default: str,
    is_set: Callable[[str], bool],
    given: dict[str, dict] | None = None,
) -> dict[str, dict]:
    """``settings.KMS["providers"]``: ``{name: {"class": dotted path, **options}}`` from ``HMD_*`` variables.

    Lists each built-in provider that is configured (one of its ``CONFIGURED_BY``
    variables is set, or ``given`` has options for it) and always the ``default``
    one, so a missing setting is reported by name. Options are each provider's
    ``OPTIONS`` read through ``env``, then ``given[name]``: what the project
    computes itself (the local keyring's path, its master key).

    :raises ConfigurationError: a built-in provider's module cannot be imported.
    """
    given = given or {}
    providers = {}
    for name, (path, _package) in BUILTIN_PROVIDERS.items():
        cls = load_provider_class(name)  # the provider's module only: SDKs load when one is built
        if name in given or name == default or any(is_set(variable) for variable in cls.CONFIGURED_BY):
            providers[name] = {"class": path, **cls.options_from_env(env), **given.get(name, {})}
    return providers


def get_provider(name: str | None = None) -> KMSProvider:
    """Return the configured provider ``name`` (default: ``HMD_KMS_PROVIDER``), built once.

    :raises ConfigurationError: unknown provider, missing SDK or bad options.
    """
    config = _config_loader()
    name = name or config.get("default") or "local"
    with _lock:
        provider = _instances.get(name)
        if provider is not None:
            return provider
    options = dict(config.get("providers", {}).get(name, {}))
    cls = load_provider_class(name, options.pop("class", None))
    # Every provider handed out is metered (calls, errors, latency; see metrics.py).
    provider = instrument(cls.from_config(options), label=name)
    with _lock:
        return _instances.setdefault(name, provider)
