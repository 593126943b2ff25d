"""Secret sources as managed secrets see them: never a way into Keyvault's own secrets.

Keyvault reads its own secrets (``HMD_SECRET_KEY``, ``HMD_AUDIT_SIGNING_KEY``,
``HMD_DATABASE_PASSWORD`` …) through the same sources as the secrets it manages
(``HMD_X``, ``HMD_X_FILE``, ``HMD_X_REF=vault:…``). A managed secret's source and
path are chosen by a Key administrator in the console, and some executors send the
value they read to an endpoint (an OAuth token request, a database login). So a
path that reached one of Keyvault's own secrets would let an administrator send it
anywhere. Every read or write a managed secret makes goes through
:func:`managed_source`, whose sources refuse such paths with :class:`OwnSecretRefused`:

``env``
    A positive rule rather than a list of forbidden names: managed secrets read only
    variables under their own prefix, ``HMD_MANAGED_`` (path ``payments_api`` reads
    ``HMD_MANAGED_PAYMENTS_API``). Keyvault's settings never use that prefix, so no
    spelling of a path reaches them, and a setting added tomorrow is out of reach
    without anyone remembering to list it. A ``HMD_MANAGED_X_FILE`` file is checked
    like a ``file`` path, and a variable one of Keyvault's own ``env:`` references
    names is refused too.
``file``
    The real path (symlinks and ``..`` resolved) must stay inside the source's folder
    and must not be one of Keyvault's own files: anything under ``HMD_DATA_DIR``
    (development secrets, SQLite database, local keyring, audit witness, broker)
    except the file source's own sub-folder, any file or folder an ``HMD_*`` variable
    names (every ``HMD_X_FILE``, ``file:`` reference, CA bundle, token or database
    path), and the Kubernetes service-account folder.
``vault`` / ``aws`` / ``gcp`` / ``k8s``
    A path naming the same stored secret as one of Keyvault's ``HMD_X_REF``
    references is refused, whatever field or key it asks for (the whole document is
    Keyvault's): same KV mount and path, same Secrets Manager name (or its ARN),
    same project and secret id, same namespace and Secret name.

Paths are not the whole story: the same stored secret can reach Keyvault under a name
no ``HMD_*`` variable gives (docs/ops/secrets.md's Kubernetes layout mounts the Secret
``keyvault-secrets`` as files, and the service account may also read it through the
``k8s`` source). So every value a managed secret reads is also compared with the
values of Keyvault's own secrets as this process holds them (:func:`own_values`);
one that contains any of them is refused the same way.

The one deliberate exception is ``HMD_SECRET_KEY_KEYRING``: Keyvault rotates its own
cookie-signing keyring as a managed secret of type *cookie signing*, whose executor
never sends a value anywhere. :func:`managed_source` lets only that type's own path
reach it (``allow_own``).

Like the rest of this package, the path checks need no Django settings: Keyvault's own
secrets are found in the environment, read the way :mod:`keyvault.config` reads them.
Only :func:`own_values` reads the values Django's settings hold.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .base import (
    SecretAccessDenied,
    SecretSource,
    SecretSourceError,
    SecretVersion,
    SecretVersionInfo,
    split_field,
)
from .env import EnvSource
from .files import FileSource
from .registry import get_source, source_options

#: The only environment variables a managed secret of source ``env`` can read.
MANAGED_ENV_PREFIX = "HMD_MANAGED_"
#: Keyvault's own secret that a cookie-signing managed secret may rotate (see the module docstring).
OWN_COOKIE_KEYRING = "HMD_SECRET_KEY_KEYRING"
#: Where Kubernetes mounts a pod's service-account token (Keyvault's own credential for k8s and Vault).
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
#: Variables that name the managed secrets' own folder, not a file of Keyvault's.
_NOT_OWN = ("HMD_SECRET_FILES_DIR",)
_AWS_ARN = re.compile(r"^arn:[^:]+:secretsmanager:[^:]*:[^:]*:secret:(?P<name>.+?)(?:-[A-Za-z0-9]{6})?$")
_UNSAFE_ENV = re.compile(r"[^A-Z0-9_]")
_GCP_NAME = re.compile(r"^projects/(?P<project>[^/]+)/secrets/(?P<secret>[^/]+)")
#: Settings holding one of Keyvault's own secret values (besides SECRET_KEY and its fallbacks).
_OWN_VALUE_SETTINGS = ("AUDIT_SIGNING_KEY", "AUDIT_HMAC_KEY", "LOCAL_KMS_MASTER_KEY", "METRICS_TOKEN",
                       "EMAIL_HOST_PASSWORD")
#: Options of KMS providers and secret sources that hold a credential.
_CREDENTIAL_OPTIONS = frozenset({"token", "secret_id", "pin", "master_key", "password", "secret_access_key"})
#: Shorter values are not compared: a managed value may well contain "true" or a port number.
MIN_OWN_VALUE_LENGTH = 16


class OwnSecretRefused(SecretAccessDenied):
    """The path leads to one of Keyvault's own secrets or configuration files: managed secrets never touch it."""


# -- what is Keyvault's own ------------------------------------------------------------


@dataclass(frozen=True)
class OwnSecrets:
    """Keyvault's own secrets as locations, each with the variable that points at it."""

    #: real path -> variable
    files: dict[str, str] = field(default_factory=dict)
    #: real folder -> variable (everything below is Keyvault's)
    folders: dict[str, str] = field(default_factory=dict)
    #: (source, …location) -> variable, for HMD_X_REF targets and ``env:`` names
    locations: dict[tuple, str] = field(default_factory=dict)

    def without(self, variables: Iterable[str]) -> OwnSecrets:
        names = {name for variable in variables for name in (variable, f"{variable}_FILE", f"{variable}_REF")}
        keep = lambda mapping: {k: v for k, v in mapping.items() if v not in names}  # noqa: E731
        return OwnSecrets(keep(self.files), keep(self.folders), keep(self.locations))


def _data_dir(environ: Mapping[str, str]) -> str:
    default = Path(__file__).resolve().parents[2] / "var"
    return os.path.realpath(environ.get("HMD_DATA_DIR") or default)


def _path_value(value: str) -> str | None:
    """The filesystem path a setting's value names, if it names one."""
    value = value.strip()
    if value.startswith("sqlite:"):
        value = "/" + value.partition(":")[2].lstrip("/")
    return value if value.startswith("/") else None


def own_secrets(environ: Mapping[str, str] | None = None,
                reference_options: Callable[[], dict] | None = None) -> OwnSecrets:
    """Read the environment for every place Keyvault's own configuration and secrets are kept.

    :param reference_options: returns ``{source: options}`` as ``HMD_X_REF`` references use them
        (``keyvault.config.all_secret_source_options``); by default the managed sources' options.
    """
    from keyvault.config import PREFIX, parse_secret_ref  # config reads only the environment

    environ = os.environ if environ is None else environ
    own = OwnSecrets()
    own.folders[_data_dir(environ)] = "HMD_DATA_DIR"
    own.folders[os.path.realpath(SERVICE_ACCOUNT_DIR)] = "kubernetes service account"
    options = None
    for variable, value in environ.items():
        if not variable.startswith(PREFIX) or variable.startswith(MANAGED_ENV_PREFIX) or variable in _NOT_OWN:
            continue
        if not value:
            continue
        if variable.endswith("_REF"):
            try:
                scheme, path, overrides = parse_secret_ref(value)
            except SecretSourceError:
                continue  # start-up reports a bad reference; it leads nowhere
            if scheme == "file":
                own.files[os.path.realpath(path)] = variable
                continue
            if options is None:
                options = reference_options() if reference_options else {}
            for location in _locations(scheme, path, {**(options.get(scheme) or {}), **overrides}, own=True):
                own.locations[location] = variable
            continue
        path = _path_value(value)
        if path is None:
            continue
        real = os.path.realpath(path)
        (own.folders if os.path.isdir(real) else own.files)[real] = variable
    return own


# -- locations: which stored secret a path names, without its field ---------------------


def _location(scheme: str, path: str, options: Mapping) -> tuple | None:
    base, _ = split_field(path)
    if scheme == "env":
        return ("env", EnvSource(options.get("prefix") or "HMD_", environ={}).variable(base))
    if scheme == "vault":
        mount = "/".join(p for p in str(options.get("mount") or "secret").split("/") if p)
        return ("vault", mount, "/".join(p for p in base.split("/") if p))
    if scheme == "aws":
        match = _AWS_ARN.match(base)
        return ("aws", match.group("name") if match else base)
    if scheme == "gcp":
        match = _GCP_NAME.match(base)
        if match:
            return ("gcp", match.group("project"), match.group("secret"))
        return ("gcp", str(options.get("project") or ""), base)
    if scheme == "k8s":
        namespace, _, name = base.rpartition("/")
        return ("k8s", namespace or _k8s_namespace(options), name)
    return None


def _k8s_namespace(options: Mapping) -> str:
    if options.get("namespace"):
        return str(options["namespace"])
    try:
        return Path(SERVICE_ACCOUNT_DIR, "namespace").read_text().strip() or "default"
    except OSError:
        return "default"


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def check_file(path: str | os.PathLike, own: OwnSecrets, *, root: str | os.PathLike | None = None) -> None:
    """Refuse a file that is Keyvault's own (its real path), or that leaves ``root``.

    :raises OwnSecretRefused:
    """
    real = os.path.realpath(path)
    root = os.path.realpath(root) if root is not None else None
    if root is not None and not _under(real, root):
        raise OwnSecretRefused("the secret file resolves outside the file source's folder")
    variable = own.files.get(real)
    if variable is None:
        for folder, name in own.folders.items():
            # The file source's own folder may sit inside HMD_DATA_DIR (its default): only that part is open.
            carved_out = root is not None and root != folder and _under(root, folder) and _under(real, root)
            if _under(real, folder) and not carved_out:
                variable = name
                break
    if variable is not None:
        raise OwnSecretRefused(f"that path is one of Keyvault's own files ({variable}); managed secrets cannot use it")


def _locations(scheme: str, path: str, options: Mapping, *, own: bool = False) -> set[tuple]:
    """Keys under which ``path`` is compared: :func:`_location`, and what the provider may also read it as.

    An ARN's name may or may not end in the six-character suffix AWS adds (a name such as
    ``prod/kv-signer`` looks like one, and AWS resolves the partial ARN ``…:secret:prod/kv-signer``
    to it), so both readings count. A GCP project may be named by its number, which cannot be
    told from its id here: a numbered project on either side matches the same secret id in any
    project (``own``: the keys Keyvault's own reference is stored under).
    """
    location = _location(scheme, path, options)
    if location is None:
        return set()
    found = {location}
    base, _ = split_field(path)
    if scheme == "aws" and _AWS_ARN.match(base):
        found.add(("aws", base.partition(":secret:")[2]))
    if scheme == "gcp":
        _, project, secret = location
        if own:
            found.add(("gcp", "*", secret))
            if project.isdigit():
                found.add(("gcp", "#", secret))
        else:
            found.add(("gcp", "#", secret))
            if project.isdigit():
                found.add(("gcp", "*", secret))
    return found


def check_location(scheme: str, path: str, options: Mapping, own: OwnSecrets) -> None:
    """Refuse a path of source ``scheme`` naming a secret one of Keyvault's own references points at.

    :raises OwnSecretRefused:
    """
    candidates = sorted(_locations(scheme, path, options), key=repr)
    variable = next((own.locations[c] for c in candidates if c in own.locations), None)
    if variable is not None:
        raise OwnSecretRefused(f"that secret is one of Keyvault's own ({variable}); managed secrets cannot use it")


def own_values(*, cookie_keys: bool = True) -> list[str]:
    """Keyvault's own secret values as this process holds them (Django settings), however they were delivered.

    :param cookie_keys: include ``SECRET_KEY`` and its fallbacks (not for the cookie-signing keyring's own rotation).
    """
    from django.conf import settings

    values = [settings.SECRET_KEY, *settings.SECRET_KEY_FALLBACKS] if cookie_keys else []
    values += [getattr(settings, name, None) for name in _OWN_VALUE_SETTINGS]
    values += [database.get("PASSWORD") for database in settings.DATABASES.values()]
    for configured in (getattr(settings, "KMS", {}).get("providers"), getattr(settings, "SECRET_SOURCES", {}).get("sources")):
        for options in (configured or {}).values():
            values += [value for name, value in (options or {}).items() if name in _CREDENTIAL_OPTIONS]
    return [value for value in values if isinstance(value, str) and len(value) >= MIN_OWN_VALUE_LENGTH]


def check_value(value: str, own: Iterable[str]) -> None:
    """Refuse a value read for a managed secret that contains one of Keyvault's own. :raises OwnSecretRefused:"""
    if isinstance(value, str) and any(secret in value for secret in own):
        raise OwnSecretRefused("that secret holds one of Keyvault's own secret values; managed secrets cannot use it")


# -- the guarded sources ----------------------------------------------------------------------


class ManagedSource(SecretSource):
    """A configured source, with every path checked against Keyvault's own secrets first."""

    def __init__(self, inner: SecretSource, check: Callable[[str], None],
                 check_value: Callable[[str], None] = lambda value: None) -> None:
        self._inner, self._check, self._check_value = inner, check, check_value
        self.name, self.writable = inner.name, inner.writable

    def __repr__(self) -> str:
        return f"<ManagedSource {self._inner!r}>"

    def check(self, path: str) -> None:
        """Refuse ``path`` if it leads to one of Keyvault's own secrets. :raises OwnSecretRefused:"""
        self._check(path)

    def read(self, path: str, *, version: str | None = None) -> SecretVersion:
        self._check(path)
        found = self._inner.read(path, version=version)
        self._check_value(found.value)
        return found

    def write(self, path: str, value: str) -> SecretVersion:
        self._check(path)
        return self._inner.write(path, value)

    def list_versions(self, path: str) -> list[SecretVersionInfo]:
        self._check(path)
        return self._inner.list_versions(path)

    def delete_version(self, path: str, version: str) -> None:
        self._check(path)
        self._inner.delete_version(path, version)

    def health_check(self) -> tuple[bool, str]:
        return self._inner.health_check()


def managed_source(name: str, *, allow_own: Iterable[str] = (),
                   environ: Mapping[str, str] | None = None) -> ManagedSource:
    """The configured source ``name`` as a managed secret may use it (see the module docstring).

    :param allow_own: Keyvault's own variables this use may reach (only :data:`OWN_COOKIE_KEYRING`,
        for the cookie-signing executor).
    :raises SecretSourceConfigurationError: unknown or unconfigured source.
    """
    from keyvault.config import all_secret_source_options

    environ = os.environ if environ is None else environ
    allowed = tuple(allow_own)

    def own() -> OwnSecrets:
        found = own_secrets(environ, lambda: all_secret_source_options(Path(_data_dir(environ))))
        return found.without(allowed) if allowed else found

    def values(value: str) -> None:
        check_value(value, own_values(cookie_keys=OWN_COOKIE_KEYRING not in allowed))

    inner = get_source(name)
    if isinstance(inner, EnvSource):
        def file_guard(file_name: str) -> None:
            check_file(file_name, own())

        env = EnvSource(MANAGED_ENV_PREFIX, environ=environ, file_guard=file_guard)

        def check_env(path: str) -> None:
            # Not the boundary (the prefix is): a clear refusal for a path that names a setting of Keyvault's.
            name = _UNSAFE_ENV.sub("_", path.upper())
            setting = name if name.startswith("HMD_") else "HMD_" + name
            if not name.startswith(MANAGED_ENV_PREFIX) and (
                name.startswith("HMD_") or any(environ.get(setting + end) for end in ("", "_FILE", "_REF"))
            ):
                raise OwnSecretRefused(f"{setting} is one of Keyvault's own settings; managed secrets read only "
                                       f"{MANAGED_ENV_PREFIX}* variables")
            variable = env.variable(path)
            check_location("env", variable, {"prefix": MANAGED_ENV_PREFIX}, own())
            if environ.get(variable + "_FILE"):
                file_guard(environ[variable + "_FILE"])

        return ManagedSource(env, check_env, values)
    if isinstance(inner, FileSource):
        root = os.path.realpath(inner.root)

        def check_path(path: str) -> None:
            check_file(inner._live(path), own(), root=root)
            check_file(inner._history(path), own(), root=root)

        return ManagedSource(inner, check_path, values)
    options = source_options(name)
    return ManagedSource(inner, lambda path: check_location(inner.name, path, options, own()), values)
