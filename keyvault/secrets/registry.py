"""Secret-source registry: names to classes, instances built once from configuration.

Like :mod:`keyvault.kms.registry`, nothing here imports Django. The Django app
installs a config loader returning ``settings.SECRET_SOURCES`` and calls
:func:`reset_sources` on ``setting_changed``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from keyvault.kms.loading import import_string

from .base import SecretSource, SecretSourceConfigurationError

#: Built-in sources: registry name -> (dotted class path, pip package of its SDK).
BUILTIN_SOURCES: dict[str, tuple[str, str | None]] = {
    "env": ("keyvault.secrets.env.EnvSource", None),
    "file": ("keyvault.secrets.files.FileSource", None),
    "vault": ("keyvault.secrets.vault_kv.VaultKVSource", "hvac"),
    "aws": ("keyvault.secrets.aws_sm.AWSSecretsManagerSource", "boto3"),
    "gcp": ("keyvault.secrets.gcp_sm.GCPSecretManagerSource", "google-cloud-secret-manager"),
    "k8s": ("keyvault.secrets.kubernetes.KubernetesSecretSource", None),
}

ConfigLoader = Callable[[], dict]

_lock = threading.Lock()
_instances: dict[str, SecretSource] = {}
_config_loader: ConfigLoader = lambda: {"default": "env", "sources": {"env": {}}}  # noqa: E731


def set_config_loader(loader: ConfigLoader) -> None:
    """Install the callable returning ``{"default": name, "sources": {name: options}}``."""
    global _config_loader
    _config_loader = loader
    reset_sources()


def reset_sources(**_signal_kwargs) -> None:
    """Forget every built source (connected to Django's ``setting_changed``)."""
    with _lock:
        _instances.clear()


def source_names() -> list[str]:
    """Return the names of the configured sources."""
    return sorted(_config_loader().get("sources", {}))


def source_options(name: str) -> dict:
    """The configured options of source ``name`` (empty if it is not configured)."""
    return dict(_config_loader().get("sources", {}).get(name) or {})


def default_source_name() -> str:
    """Return the name of the source used when none is named (``HMD_SECRET_SOURCE``)."""
    return _config_loader().get("default") or "env"


def load_source_class(name: str, dotted_path: str | None = None) -> type[SecretSource]:
    """Import the class for source ``name``.

    :raises SecretSourceConfigurationError: unknown name, or its module cannot be imported.
    """
    path, package = BUILTIN_SOURCES.get(name, (dotted_path, None))
    path = dotted_path or path
    if not path:
        known = ", ".join(sorted(BUILTIN_SOURCES))
        raise SecretSourceConfigurationError(f"unknown secret source {name!r}; use one of: {known}")
    return import_string(
        path, what=f"secret source {name!r}", install_hint=package or "", error=SecretSourceConfigurationError
    )


def build_source(name: str, options: dict | None = None) -> SecretSource:
    """Build a new, uncached source ``name`` from ``options`` (``class`` may name a dotted path)."""
    options = dict(options or {})
    cls = load_source_class(name, options.pop("class", None))
    return cls.from_config(options)


def get_source(name: str | None = None) -> SecretSource:
    """Return the configured source ``name`` (default: ``HMD_SECRET_SOURCE``), built once.

    :raises SecretSourceConfigurationError: unknown or unconfigured source, missing SDK, bad options.
    """
    config = _config_loader()
    name = name or config.get("default") or "env"
    with _lock:
        source = _instances.get(name)
        if source is not None:
            return source
    sources = config.get("sources", {})
    if name not in sources:
        configured = ", ".join(sorted(sources)) or "none"
        raise SecretSourceConfigurationError(f"secret source {name!r} is not configured (configured: {configured})")
    source = build_source(name, sources[name])
    with _lock:
        return _instances.setdefault(name, source)
