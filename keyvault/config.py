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


#: Process umask: files Keyvault creates (SQLite and its -wal/-shm files, broker messages, the keyring,
#: the beat schedule, cache entries) are readable by their owner only. SQLite gives -wal/-shm the main
#: file's mode, so the umask must be in force before the first connection.
PRIVATE_UMASK = 0o077

#: Names Keyvault itself writes into HMD_DATA_DIR: an existing folder holding one of them is ours to tighten.
DATA_DIR_MARKERS = ("keyvault.sqlite3", "secret_key", "local-kms.keyring", "broker", "celerybeat-schedule", "cache")


def private_data_dir(data_dir: Path) -> Path:
    """Set the private umask and make ``data_dir`` 0700 with no group/other bits on what it holds.

    A folder we create is 0700. An existing one is tightened only when it is plainly
    Keyvault's (it holds one of :data:`DATA_DIR_MARKERS`, or is empty) and owned by us,
    so a mistaken ``HMD_DATA_DIR=/srv`` never rewrites the modes of a shared folder;
    ``manage.py check --deploy`` reports whatever is left loose (keyvault/checks.py).
    Entries inside lose their group/other bits (files become 0600, folders 0700); the
    folder itself being 0700 already keeps their contents out of other users' reach.
    """
    os.umask(PRIVATE_UMASK)
    try:
        data_dir.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    try:
        info = data_dir.stat()
        entries = list(os.scandir(data_dir))
    except OSError:
        return data_dir  # an unreadable folder: start-up reports it where it is used
    ours = not entries or any(entry.name.startswith(DATA_DIR_MARKERS) for entry in entries)
    if not ours or info.st_uid != os.geteuid():
        return data_dir
    _tighten(data_dir, info.st_mode)
    for entry in entries:
        try:
            if not entry.is_symlink():
                _tighten(entry.path, entry.stat(follow_symlinks=False).st_mode)
        except OSError:
            continue  # removed meanwhile, or another user's: the deploy check names it
    return data_dir


def _tighten(path, mode: int) -> None:
    if mode & 0o077:
        os.chmod(path, mode & 0o7700)


def dev_secret(data_dir: Path, filename: str, make) -> str:
    """Return a development secret stored in ``data_dir/filename``, creating it once.

    The file is created with mode 0600 and never overwritten, so every process
    (web, worker, beat, ``manage.py``) sees the same value.
    """
    path = data_dir / filename
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
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


# -- secret sources and references -------------------------------------------

#: Where Kubernetes mounts a pod's service-account credentials.
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def secret_sources_config(data_dir: Path) -> dict:
    """``settings.SECRET_SOURCES``: ``{"default": name, "sources": {name: options}}`` from ``HMD_*``.

    ``env`` and ``file`` are always configured; ``vault``, ``aws``, ``gcp`` and
    ``k8s`` when their address/region/project/API variable is set (or when they
    are the default, so a missing setting is reported by name). Vault, AWS and
    GCP reuse the variables of the matching KMS provider.
    """
    default = env.str("HMD_SECRET_SOURCE", default="env")
    options = all_secret_source_options(data_dir)
    configured = {
        "env": True,
        "file": True,
        "vault": is_set("HMD_VAULT_ADDR"),
        "aws": is_set("HMD_AWS_REGION") or is_set("HMD_AWS_SECRETSMANAGER_ENDPOINT_URL"),
        "gcp": is_set("HMD_GCP_PROJECT"),
        "k8s": is_set("HMD_K8S_API_URL") or bool(os.environ.get("KUBERNETES_SERVICE_HOST")),
    }
    return {"default": default, "sources": {n: o for n, o in options.items() if configured[n] or n == default}}


def all_secret_source_options(data_dir: Path) -> dict[str, dict]:
    """Every source's options from its ``HMD_*`` variables, configured or not."""
    return {
        "env": {"prefix": env.str("HMD_SECRET_ENV_PREFIX", default=PREFIX)},
        "file": {
            "directory": env.str("HMD_SECRET_FILES_DIR", default=str(data_dir / "secrets")),
            "read_only": env.bool("HMD_SECRET_FILES_READ_ONLY", default=False),
        },
        "vault": {
            "addr": env.str("HMD_VAULT_ADDR", default=""),
            "token": env.str("HMD_VAULT_TOKEN", default=""),
            "role_id": env.str("HMD_VAULT_ROLE_ID", default=""),
            "secret_id": env.str("HMD_VAULT_SECRET_ID", default=""),
            "kubernetes_role": env.str("HMD_VAULT_KUBERNETES_ROLE", default=""),
            "kubernetes_jwt_path": env.str("HMD_VAULT_KUBERNETES_JWT_PATH", default=f"{SERVICE_ACCOUNT_DIR}/token"),
            "namespace": env.str("HMD_VAULT_NAMESPACE", default=""),
            "mount": env.str("HMD_VAULT_KV_MOUNT", default="secret"),
            "ca_cert": env.str("HMD_VAULT_CACERT", default=""),
            "timeout": env.float("HMD_VAULT_TIMEOUT", default=10.0),
        },
        "aws": {
            "region": env.str("HMD_AWS_REGION", default=""),
            "endpoint_url": env.str("HMD_AWS_SECRETSMANAGER_ENDPOINT_URL", default=""),
            "connect_timeout": env.float("HMD_AWS_CONNECT_TIMEOUT", default=5.0),
            "read_timeout": env.float("HMD_AWS_READ_TIMEOUT", default=10.0),
            "max_attempts": env.int("HMD_AWS_MAX_ATTEMPTS", default=3),
        },
        "gcp": {
            "project": env.str("HMD_GCP_PROJECT", default=""),
            "endpoint": env.str("HMD_GCP_SECRETMANAGER_ENDPOINT", default=""),
            "anonymous_credentials": env.bool("HMD_GCP_ANONYMOUS_CREDENTIALS", default=False),
            "timeout": env.float("HMD_GCP_TIMEOUT", default=10.0),
        },
        "k8s": {
            "api_url": env.str("HMD_K8S_API_URL", default="https://kubernetes.default.svc"),
            "namespace": env.str("HMD_K8S_NAMESPACE", default=""),
            "token_path": env.str("HMD_K8S_TOKEN_PATH", default=f"{SERVICE_ACCOUNT_DIR}/token"),
            "ca_cert": env.str("HMD_K8S_CACERT", default=""),
            "timeout": env.float("HMD_K8S_TIMEOUT", default=10.0),
        },
    }


REFERENCE_SCHEMES = ("env", "file", "vault", "aws", "gcp", "k8s")


def parse_secret_ref(reference: str) -> tuple[str, str, dict]:
    """Parse a secret reference into ``(source name, path within the source, source option overrides)``.

    ``vault:secret/keyvault#secret_key``
        KV v2 mount ``secret``, secret ``keyvault``, field ``secret_key`` (default field ``value``).
    ``aws:<name or ARN>[#json-field]``
        a Secrets Manager secret; with ``#field`` its SecretString is a JSON object.
    ``gcp:projects/<p>/secrets/<s>[#json-field]`` or ``gcp:<s>``
        a Secret Manager secret (project from HMD_GCP_PROJECT when not given).
    ``k8s:<namespace>/<name>#<key>`` or ``k8s:<name>#<key>``
        one key of a Kubernetes Secret, through the API.
    ``file:/absolute/path``
        a file (mounted secrets included), reread when it changes.
    ``env:NAME``
        an environment variable (``HMD_`` prefix optional).

    :raises InvalidSecretReference: the reference does not follow this syntax.
    """
    from keyvault.secrets.base import InvalidSecretReference

    if not isinstance(reference, str) or ":" not in reference:
        raise InvalidSecretReference(
            f"a secret reference looks like <source>:<path>[#field] with source one of {', '.join(REFERENCE_SCHEMES)}"
        )
    scheme, _, rest = reference.strip().partition(":")
    scheme = {"kubernetes": "k8s", "awssm": "aws", "gcpsm": "gcp"}.get(scheme, scheme)
    if scheme not in REFERENCE_SCHEMES:
        raise InvalidSecretReference(f"unknown secret source {scheme!r} in a reference; use one of {REFERENCE_SCHEMES}")
    if not rest or rest.startswith("#"):
        raise InvalidSecretReference(f"the {scheme}: reference names no secret")
    overrides: dict = {}
    if scheme == "vault":
        mount, slash, path = rest.partition("/")
        if not slash or not mount or not path or path.startswith("#"):
            raise InvalidSecretReference("a vault: reference is vault:<kv mount>/<path>[#field]")
        overrides["mount"] = mount
        rest = path
    elif scheme == "file" and not Path(rest).is_absolute():
        raise InvalidSecretReference("a file: reference is file:/absolute/path")
    return scheme, rest, overrides


def resolve_secret_ref(reference: str, *, sources: dict | None = None) -> str:
    """Read the current value a secret reference points at, with the source's own ``HMD_*`` settings.

    :raises keyvault.secrets.SecretSourceError: (subclasses) bad reference, source errors.
    """
    from keyvault.secrets.registry import build_source

    scheme, path, overrides = parse_secret_ref(reference)
    if scheme == "file":
        from keyvault.secrets.files import read_text_cached

        return read_text_cached(reference.partition(":")[2])[0]
    if sources is None:
        sources = all_secret_source_options(_data_dir())
    options = {**(sources.get(scheme) or {}), **overrides}
    return build_source(scheme, options).read(path).value


def _data_dir() -> Path:
    return Path(env.str("HMD_DATA_DIR", default=str(Path(__file__).resolve().parent.parent / "var"))).resolve()


_REQUIRED = object()


def get_secret(name: str, default: object = _REQUIRED, *, sources: dict | None = None) -> str:
    """Return Keyvault's own secret ``name`` (``HMD_SECRET_KEY``; the ``HMD_`` prefix is optional).

    In order: ``HMD_X_REF`` (a reference, see :func:`parse_secret_ref`, read
    through that source with its own ``HMD_*`` settings), then the file named by
    ``HMD_X_FILE``, then ``HMD_X`` (django-environ's file-aware order), then ``default``.

    :raises keyvault.secrets.SecretNotFound: none is set and there is no default.
    :raises keyvault.secrets.SecretSourceError: the reference is invalid or its source failed;
        the message names the variable, never the value.
    """
    from keyvault.secrets.base import SecretNotFound, SecretSourceError

    variable = name if name.startswith(PREFIX) else PREFIX + name
    reference = env.str(variable + "_REF", default="")
    if reference:
        try:
            return resolve_secret_ref(reference, sources=sources)
        except SecretSourceError as exc:
            raise type(exc)(f"{variable}_REF={reference}: {exc}") from None
    if is_set(variable):
        try:
            return env.str(variable)
        except OSError as exc:
            raise SecretNotFound(f"{variable}_FILE cannot be read: {exc.strerror}") from None
    if default is not _REQUIRED:
        return default  # type: ignore[return-value]
    raise SecretNotFound(f"{variable} is not set (nor {variable}_REF, nor {variable}_FILE)")
