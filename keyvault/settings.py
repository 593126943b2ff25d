"""Django settings for Keyvault, read from ``HMD_*`` environment variables.

Every variable is listed with its default in README.md ("Configuration").
Each may instead be given as a file: ``HMD_<NAME>_FILE=/path``.
With ``HMD_DEBUG=false`` nothing secret is ever generated: a missing secret
stops start-up with an error naming the variable.
"""

from __future__ import annotations

from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

from keyvault.config import (
    dev_secret,
    env,
    get_secret,
    is_set,
    new_django_secret_key,
    private_data_dir,
    secret_sources_config,
)
from keyvault.kms.local import DEVELOPMENT_MASTER_KEY_FILE, generate_master_key
from keyvault.kms.registry import providers_from_env

BASE_DIR = Path(__file__).resolve().parent.parent

DEBUG = env.bool("HMD_DEBUG", default=True)
# 0700, and the process umask 077, before anything (secrets, SQLite, broker) writes there.
DATA_DIR = private_data_dir(Path(env.str("HMD_DATA_DIR", default=str(BASE_DIR / "var"))).resolve())


def _secret(name: str, dev_file: str, make) -> str:
    """A secret from HMD_X_REF (any secret source), HMD_X or HMD_X_FILE; generated into DATA_DIR in development only."""
    if is_set(name) or is_set(name + "_REF"):
        return _get_secret(name)
    if DEBUG:
        return dev_secret(DATA_DIR, dev_file, make)
    raise ImproperlyConfigured(f"{name} (or {name}_FILE, or {name}_REF) must be set when HMD_DEBUG=false")


def _get_secret(name: str) -> str:
    from keyvault.secrets.base import SecretSourceError

    try:
        return get_secret(name)
    except SecretSourceError as exc:
        raise ImproperlyConfigured(str(exc)) from None


if is_set("HMD_SECRET_KEY_KEYRING") or is_set("HMD_SECRET_KEY_KEYRING_REF"):
    # A keyring {"current": …, "previous": […]} that Keyvault rotates (secret type cookie_signing):
    # current signs, previous only verify. Without it, HMD_SECRET_KEY(_FALLBACKS) as before.
    from keyvault.secrets.keyring import KeyringError, parse as _parse_keyring

    try:
        SECRET_KEY, SECRET_KEY_FALLBACKS = _parse_keyring(_get_secret("HMD_SECRET_KEY_KEYRING"))
    except KeyringError as _exc:
        raise ImproperlyConfigured(f"HMD_SECRET_KEY_KEYRING: {_exc}") from None
else:
    SECRET_KEY = _secret("HMD_SECRET_KEY", "secret_key", new_django_secret_key)
    SECRET_KEY_FALLBACKS = env.list("HMD_SECRET_KEY_FALLBACKS", default=[])
ALLOWED_HOSTS = env.list("HMD_ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("HMD_CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "keyvault",
    "rotation",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "keyvault.urls"
WSGI_APPLICATION = "keyvault.wsgi.application"
ASGI_APPLICATION = "keyvault.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "keyvault" / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {"default": env.db("HMD_DATABASE_URL", default=f"sqlite:///{DATA_DIR / 'keyvault.sqlite3'}")}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # The web process, workers and beat share one file: WAL lets readers run beside
    # the writer, IMMEDIATE takes the write lock up front (no upgrade deadlocks),
    # and the timeout waits for the lock instead of failing with "database is locked".
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            "transaction_mode": "IMMEDIATE",
            "timeout": env.int("HMD_SQLITE_TIMEOUT", default=30),
        }
    )
    # Tests use a file too (not shared-cache memory), so locking behaves as in production.
    DATABASES["default"]["TEST"] = {"NAME": str(DATA_DIR / "test-keyvault.sqlite3")}


def _prepare_threshold(text: str) -> int | None:
    if text.strip().lower() in ("none", "off", ""):
        return None  # a pooler that keeps no prepared statements (PgBouncer transaction mode before 1.21)
    try:
        value = int(text)
        if value < 0:
            raise ValueError
        return value
    except ValueError:
        raise ImproperlyConfigured(f"HMD_DATABASE_PREPARE_THRESHOLD: expected a count or none, got {text!r}") from None


# Keep a connection per web thread or worker instead of opening one per request: a new
# PostgreSQL connection costs a TCP handshake, authentication and session set-up, which
# was most of an API call's latency. Health checks drop a connection a database restart broke.
DATABASES["default"]["CONN_MAX_AGE"] = env.int("HMD_DATABASE_CONN_MAX_AGE", default=300)
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
if DATABASES["default"]["ENGINE"].endswith("postgresql"):
    # Statements the hot paths run through keyvault.models.prepared are prepared after this
    # many calls on a connection (the ORM binds on the client and never prepares).
    DATABASES["default"].setdefault("OPTIONS", {})["prepare_threshold"] = _prepare_threshold(
        env.str("HMD_DATABASE_PREPARE_THRESHOLD", default="5"))
if is_set("HMD_DATABASE_PASSWORD") or is_set("HMD_DATABASE_PASSWORD_REF"):
    # The password can live in a secret source while the rest of the URL stays plain configuration.
    DATABASES["default"]["PASSWORD"] = _get_secret("HMD_DATABASE_PASSWORD")
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator", "OPTIONS": {"min_length": 12}},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
# One date format on every page, zone named (keyvault.console.timezones); each user may pick a zone.
FORMAT_MODULE_PATH = ["keyvault.console.formats"]

STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"

LOGIN_URL = "admin:login"

# -- Celery ------------------------------------------------------------------
CELERY_BROKER_URL = env.str("HMD_BROKER_URL", default="filesystem://localhost/")
if CELERY_BROKER_URL.startswith("filesystem://"):
    _queue_dir = DATA_DIR / "broker"
    (_queue_dir / "queue").mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        # One folder for both directions: producers and consumers meet there.
        "data_folder_in": str(_queue_dir / "queue"),
        "data_folder_out": str(_queue_dir / "queue"),
        "control_folder": str(_queue_dir / "control"),
        "store_processed": False,
    }
elif CELERY_BROKER_URL.startswith(("redis://", "rediss://", "redis+socket://", "sentinel://")):
    # An unacknowledged message goes back to the queue after this long. It must exceed the
    # longest task and retry countdown, or a running task is delivered twice (harmless: the
    # second finds the partition's lease held, but wasteful). A dead worker's partitions do
    # not wait for it: their leases run out long before.
    CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": env.int("HMD_BROKER_VISIBILITY_TIMEOUT", default=3600)}
CELERY_TASK_ALWAYS_EAGER = env.bool("HMD_CELERY_EAGER", default=False)
CELERY_TASK_DEFAULT_QUEUE = env.str("HMD_CELERY_QUEUE", default="celery")
# A task is acknowledged when it ends, and given back if its worker dies, so no work is lost with a worker.
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Workers and beat wait out a broker restart instead of exiting: retry the connection forever,
# at start-up too. A running task keeps going meanwhile (its work is in the database).
CELERY_BROKER_CONNECTION_RETRY = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BROKER_CONNECTION_MAX_RETRIES = None
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = False
# Sending gives up within about a second when the broker is down; the rotation outbox keeps the message.
CELERY_TASK_PUBLISH_RETRY_POLICY = {"max_retries": 3, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TIMEZONE = "UTC"
CELERY_BEAT_SCHEDULE_FILENAME = str(DATA_DIR / "celerybeat-schedule")
# One periodic job selects everything due from our own tables; no per-key beat entries.
CELERY_BEAT_SCHEDULE = {
    "dispatch-due-rotations": {
        "task": "rotation.dispatch_due_rotations",
        "schedule": env.float("HMD_ROTATION_SWEEP_SECONDS", default=60.0),
    },
}
CELERY_BEAT_SCHEDULE["flag-expiring-secrets"] = {
    "task": "rotation.flag_expiring_secrets",
    "schedule": 86400.0,  # daily: expiry and overdue reminders for managed secrets
}
CELERY_TASK_DEFAULT_PRIORITY = 5

# -- Notifications (keyvault/ops/notify.py): expiry reminders, failed rotations ---------
NOTIFIERS = ["keyvault.ops.notify.LogNotifier", "keyvault.ops.notify.EmailNotifier", "keyvault.ops.notify.WebhookNotifier"]
NOTIFY_EMAIL_TO = env.list("HMD_NOTIFY_EMAIL_TO", default=[])
NOTIFY_WEBHOOK_URL = env.str("HMD_NOTIFY_WEBHOOK_URL", default="")
DEFAULT_FROM_EMAIL = "keyvault@localhost"
vars().update(env.email_url("HMD_EMAIL_URL", default="consolemail://"))

# -- Rotation engine -----------------------------------------------------------
# Each batch pays a commit, an audit event, a rate-limit reservation and a sample decrypt: at 5000
# they cost a few per cent of a local rewrap instead of a third (bench/rewrap.py, issue 14).
ROTATION_BATCH_SIZE = env.int("HMD_ROTATION_BATCH_SIZE", default=5000)
ROTATION_PARTITIONS = env.int("HMD_ROTATION_PARTITIONS", default=4)
# A worker holds a partition's lease this long after each batch; a dead worker's partition is taken over after it.
ROTATION_LEASE_SECONDS = env.int("HMD_ROTATION_LEASE_SECONDS", default=30)
if not 5 <= ROTATION_LEASE_SECONDS <= 600:
    raise ImproperlyConfigured("HMD_ROTATION_LEASE_SECONDS must be between 5 and 600 (longer than one batch takes)")


def _phase_seconds(name: str) -> int | dict[str, int]:
    """``300`` (every phase), or ``rewrapping=60,verifying=30`` (those phases; the others keep their defaults)."""
    text = env.str(name, default="").strip()
    if not text:
        return {}
    if text.isdigit():
        return int(text)
    phases = ("queued", "rotating", "rewrapping", "verifying", "waiting")
    try:
        pairs = {phase.strip(): int(seconds) for phase, _, seconds in (part.partition("=") for part in text.split(","))}
    except ValueError:
        pairs = {"": 0}
    if not set(pairs) <= set(phases) or min(pairs.values()) <= 0:
        raise ImproperlyConfigured(f"{name}: give seconds (300) or phase=seconds pairs of {', '.join(phases)}")
    return pairs


# Seconds without progress before the sweep sends a run's phase again, by phase (rotation/engine/recovery.py).
ROTATION_STALL_SECONDS = _phase_seconds("HMD_ROTATION_STALL_SECONDS")
# The recovery sweep (outbox, expired leases, stalled runs) runs a few times per lease period.
ROTATION_RECOVERY_SECONDS = max(1.0, ROTATION_LEASE_SECONDS / 3)
CELERY_BEAT_SCHEDULE["rotation-recovery"] = {"task": "rotation.recover", "schedule": ROTATION_RECOVERY_SECONDS}


def _rate_limits(text: str) -> dict[str, int]:
    try:
        pairs = [item.split("=", 1) for item in text.replace(" ", "").split(",") if item]
        limits = {name: int(value) for name, value in pairs}
        if any(not name or value < 0 for name, value in limits.items()):
            raise ValueError
        return limits
    except ValueError:
        raise ImproperlyConfigured(f"HMD_ROTATION_RATE_LIMITS: expected provider=calls,… (e.g. aws=1000,gcp=500), got {text!r}") from None


# Provider calls per second rotations may make, all workers together ("aws=1000,gcp=500"; 0 or
# absent: no cap). The console and `rotation rate-limit` override it per provider, live.
ROTATION_RATE_LIMITS = _rate_limits(env.str("HMD_ROTATION_RATE_LIMITS", default="aws=1000,gcp=500"))
ROTATION_BREAK_GLASS_GROUP = env.str("HMD_ROTATION_BREAK_GLASS_GROUP", default="Break glass")

# -- KMS providers -----------------------------------------------------------
KMS_PROVIDER = env.str("HMD_KMS_PROVIDER", default="local")
LOCAL_KMS_KEYRING = env.str("HMD_LOCAL_KMS_KEYRING", default=str(DATA_DIR / "local-kms.keyring"))
if KMS_PROVIDER == "local" or is_set("HMD_LOCAL_KMS_MASTER_KEY") or is_set("HMD_LOCAL_KMS_MASTER_KEY_REF") or DEBUG:
    LOCAL_KMS_MASTER_KEY = _secret("HMD_LOCAL_KMS_MASTER_KEY", DEVELOPMENT_MASTER_KEY_FILE, generate_master_key)
else:
    LOCAL_KMS_MASTER_KEY = None

# Each provider declares its own HMD_* options (OPTIONS on its class, keyvault/kms/options.py); settings add
# only what the project owns: the local keyring's place in HMD_DATA_DIR and its master key, a secret.
KMS = {
    "default": KMS_PROVIDER,
    "providers": providers_from_env(
        env,
        default=KMS_PROVIDER,
        is_set=is_set,
        given={"local": {"keyring_path": LOCAL_KMS_KEYRING, "master_key": LOCAL_KMS_MASTER_KEY}}
        if LOCAL_KMS_MASTER_KEY
        else {},
    ),
}

# Bearer token for Prometheus scrapes of /metrics (empty: only logged-in staff who may view KEKs).
METRICS_TOKEN = env.str("HMD_METRICS_TOKEN", default="")

# -- Secret sources (keyvault/secrets): where managed secrets live, and HMD_X_REF targets ---------
SECRET_SOURCES = secret_sources_config(DATA_DIR)

# Endpoints rotation executors may contact (OAuth token URLs, TLS endpoints, PostgreSQL hosts): host, host:port,
# scheme://host[:port], *.suffix or CIDR entries (rotation/executors/outbound.py). Production: nothing unless listed.
OUTBOUND_ALLOWLIST = env.list("HMD_OUTBOUND_ALLOWLIST", default=["localhost", "127.0.0.0/8", "::1"] if DEBUG else [])

# Envelope encryption: the KEK that encrypted model fields use, and the DEK cache limits
# (AWS Encryption SDK caching-CMM semantics; see keyvault/kms/cache.py).
FIELD_ENCRYPTION_KEK = env.str("HMD_FIELD_ENCRYPTION_KEK", default="default")
DEK_CACHE = {
    "max_age": env.float("HMD_DEK_CACHE_MAX_AGE", default=300.0),
    "max_messages": env.int("HMD_DEK_CACHE_MAX_MESSAGES", default=2**20),
    "max_bytes": env.int("HMD_DEK_CACHE_MAX_BYTES", default=2**32),
    "decrypt_ttl": env.float("HMD_DEK_CACHE_DECRYPT_TTL", default=300.0),
}

# -- Audit log ---------------------------------------------------------------
def _new_ed25519_key() -> str:
    import base64

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    raw = Ed25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return base64.b64encode(raw).decode("ascii")


AUDIT_HMAC_KEY = _secret("HMD_AUDIT_HMAC_KEY", "audit_hmac_key", new_django_secret_key)
AUDIT_SIGNING_KEY = _secret("HMD_AUDIT_SIGNING_KEY", "audit_signing_key", _new_ed25519_key)
AUDIT_TRUSTED_PUBLIC_KEYS = env.list("HMD_AUDIT_TRUSTED_PUBLIC_KEYS", default=[])
AUDIT_CHECKPOINT_INTERVAL = env.int("HMD_AUDIT_CHECKPOINT_INTERVAL", default=1000)
# Checkpoints also go outside the database (keyvault/audit/witness.py): file paths, https://
# webhooks, syslog:// and s3:// buckets; "none" turns the witness off (not for production).
AUDIT_WITNESS = env.list("HMD_AUDIT_WITNESS", default=[str(DATA_DIR / "audit-witness.jsonl")])
AUDIT_WITNESS_S3_LOCK_MODE = env.str("HMD_AUDIT_WITNESS_S3_LOCK_MODE", default="").upper()
AUDIT_WITNESS_S3_RETAIN_DAYS = env.int("HMD_AUDIT_WITNESS_S3_RETAIN_DAYS", default=400)
AUDIT_CHECKPOINT_SECONDS = env.float("HMD_AUDIT_CHECKPOINT_SECONDS", default=60.0)
AUDIT_VERIFY_NOW_SECONDS = env.int("HMD_AUDIT_VERIFY_NOW_SECONDS", default=60)
# Group commit of the audit chain on PostgreSQL (keyvault/audit/__init__.py): an uncontended caller chains
# its event in its own transaction; contended callers write an outbox and are sequenced in batches; off = the
# serial path (head locked per event). On by default: measured on 2 cores (bench/audit_append.py) it beats
# the serial path with 1, 8 and 32 writers (1.2x, 1.7x, 1.8x; one loaded run 0.8x with 1: bench/README.md).
AUDIT_GROUP_COMMIT = env.bool("HMD_AUDIT_GROUP_COMMIT", default=True)
# How long a web process trusts its look-up of an API token (keyvault/api/services.py): a revocation
# made in another process takes effect within this bound; in the revoking process at once.
API_TOKEN_CACHE_SECONDS = 2.0
if AUDIT_CHECKPOINT_SECONDS > 0:
    # Signs the head when it moved since the last checkpoint, so the unwitnessed tail stays short.
    CELERY_BEAT_SCHEDULE["audit-checkpoint"] = {"task": "keyvault.audit_checkpoint", "schedule": AUDIT_CHECKPOINT_SECONDS}

# -- Logging -----------------------------------------------------------------
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env.str("HMD_LOG_LEVEL", default="INFO")},
}

# == Security hardening =========================================================
# Two-factor login, login throttling, session expiry, security headers and
# production static files. Variables are listed in docs/ops/production.md.
# Everything defaults to the strict value when HMD_DEBUG=false.
from datetime import timedelta  # noqa: E402

from csp.constants import NONE, SELF  # noqa: E402

# TOTP devices are keyvault.TOTPDevice (secret encrypted); django-otp's own TOTP app (secret in clear) is not installed.
INSTALLED_APPS += ["django_otp", "axes"]


def _insert_after(anchor: str, *names: str) -> None:
    """Put middleware right after ``anchor`` (others edit the list too: no fixed indexes)."""
    position = MIDDLEWARE.index(anchor) + 1
    MIDDLEWARE[position:position] = list(names)


_insert_after("django.middleware.security.SecurityMiddleware",
              "keyvault.ops.healthz.HealthzMiddleware",  # any Host: probes send the pod's address
              "whitenoise.middleware.WhiteNoiseMiddleware", "csp.middleware.CSPMiddleware",
              "keyvault.web.request_guard.RejectMalformedRequestMiddleware")  # 400 before any view or query
_insert_after("django.contrib.auth.middleware.AuthenticationMiddleware",
              "keyvault.access.security.DeniedAuditMiddleware", "django_otp.middleware.OTPMiddleware",
              "keyvault.console.timezones.TimeZoneMiddleware")
_insert_after("django.contrib.messages.middleware.MessageMiddleware",  # both may leave a message
              "keyvault.access.security.SessionExpiryMiddleware", "keyvault.console.otp.RequireOTPMiddleware")
MIDDLEWARE.append("axes.middleware.AxesMiddleware")  # last, as django-axes requires

# Two-factor login (TOTP, django-otp): required for every console page once DEBUG is off.
REQUIRE_2FA = env.bool("HMD_REQUIRE_2FA", default=not DEBUG)
OTP_TOTP_ISSUER = env.str("HMD_2FA_ISSUER", default="Keyvault")

# Login throttling (django-axes): after N failures for one username from one client
# address, that pair is locked for a cool-off time. Not per address alone: behind a
# proxy or NAT many users share one, and five random usernames locked all of them out.
# Not per username alone either: anyone could then lock a known user out from anywhere.
# Guessing one password from many addresses is left to what a password alone cannot
# pass: the second factor (required when HMD_DEBUG=false) and the password validators;
# every failure is still audited, aggregated per address and minute (keyvault.access.security).
# Behind a reverse proxy set HMD_TRUSTED_PROXY_COUNT so the client address is taken
# from X-Forwarded-For instead of the proxy's own (keyvault.web.request_meta.client_ip).
AUTHENTICATION_BACKENDS = ["axes.backends.AxesStandaloneBackend", "django.contrib.auth.backends.ModelBackend"]
AXES_ENABLED = env.bool("HMD_LOGIN_THROTTLING", default=True)
AXES_FAILURE_LIMIT = env.int("HMD_LOGIN_FAILURE_LIMIT", default=5)
AXES_COOLOFF_TIME = timedelta(minutes=env.int("HMD_LOGIN_LOCKOUT_MINUTES", default=15))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_CLIENT_IP_CALLABLE = "keyvault.web.request_meta.client_ip"
AXES_USERNAME_CALLABLE = "keyvault.access.security.axes_username"
TRUSTED_PROXY_COUNT = env.int("HMD_TRUSTED_PROXY_COUNT", default=0)
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_TEMPLATE = "keyvault/otp/locked_out.html"
AXES_VERBOSE = False

# Sessions are stored under an HMAC of their cookie value (keyvault.access.sessions), so a copy
# of the database holds no usable session. They end after an idle time and after an
# absolute lifetime (keyvault.access.security).
SESSION_ENGINE = "keyvault.access.sessions"
SESSION_IDLE_SECONDS = env.int("HMD_SESSION_IDLE_SECONDS", default=1800)
SESSION_ABSOLUTE_SECONDS = env.int("HMD_SESSION_ABSOLUTE_SECONDS", default=43200)
SESSION_COOKIE_AGE = SESSION_ABSOLUTE_SECONDS
SESSION_EXPIRE_AT_BROWSER_CLOSE = True

# Cookies and transport. Plain-HTTP loopback runs (the load test) may turn off the
# secure-only settings explicitly; nothing else should.
_secure = env.bool("HMD_SECURE_COOKIES", default=not DEBUG)
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = _secure
SESSION_COOKIE_HTTPONLY = CSRF_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = CSRF_COOKIE_SAMESITE = "Lax"
SECURE_SSL_REDIRECT = env.bool("HMD_SECURE_SSL_REDIRECT", default=not DEBUG)
SECURE_REDIRECT_EXEMPT = [r"^healthz$"]  # probes speak plain HTTP inside the cluster
if is_set("HMD_SECURE_PROXY_SSL_HEADER"):  # e.g. "HTTP_X_FORWARDED_PROTO,https" behind a TLS proxy
    SECURE_PROXY_SSL_HEADER = tuple(env.list("HMD_SECURE_PROXY_SSL_HEADER"))
SECURE_HSTS_SECONDS = env.int("HMD_HSTS_SECONDS", default=0 if DEBUG else 31536000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("HMD_HSTS_INCLUDE_SUBDOMAINS", default=not DEBUG)
SECURE_HSTS_PRELOAD = env.bool("HMD_HSTS_PRELOAD", default=not DEBUG)
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
SECURE_CROSS_ORIGIN_OPENER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
CSRF_FAILURE_VIEW = "keyvault.access.security.csrf_failure"  # not audited as a denial (see there)


def _admin_inline_style_hashes() -> list[str]:
    """CSP hashes of the one inline <style> block Django's admin renders (change_list.html).

    Read from the installed Django so an upgrade keeps it right; scripts get no such
    allowance: every script is a static file.
    """
    import base64
    import hashlib
    import re

    import django

    template = Path(django.__file__).parent / "contrib/admin/templates/admin/change_list.html"
    try:
        blocks = re.findall(r"<style>(.*?)</style>", template.read_text(), flags=re.S)
    except OSError:
        return []
    return [f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks]


CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": [SELF],
        "script-src": [SELF],
        "style-src": [SELF, *_admin_inline_style_hashes()],
        "img-src": [SELF, "data:"],
        "font-src": [SELF],
        "connect-src": [SELF],
        "object-src": [NONE],
        "base-uri": [NONE],
        "form-action": [SELF],
        "frame-ancestors": [NONE],
    },
}

STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # WhiteNoise warns at start-up about a missing root
# Static files: collected to STATIC_ROOT and served by WhiteNoise (hashed names, gzip/brotli)
# in production; `manage.py collectstatic` runs before the web process starts (Procfile).
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"
        if DEBUG
        else "whitenoise.storage.CompressedManifestStaticFilesStorage"
    },
}

# Shared state for every process on every host (the SIEM rate limit, login-failure
# aggregation, django-axes): Redis through HMD_CACHE_URL in production. `make run`
# falls back to files under DATA_DIR, which every process on this host shares (a
# per-process memory cache would let each worker count on its own).
if is_set("HMD_CACHE_URL"):
    CACHES = {"default": env.cache_url("HMD_CACHE_URL")}
else:
    # Django culls a file cache past 300 entries, which would drop live counters under load.
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
                          "LOCATION": str(DATA_DIR / "cache"), "OPTIONS": {"MAX_ENTRIES": 10000}}}
CACHES["default"].setdefault("KEY_PREFIX", "keyvault")

# Failed logins beyond the first per address and minute are counted (keyvault.access.security);
# beat writes each finished minute's count to the audit log, even if no login follows.
CELERY_BEAT_SCHEDULE["flush-login-failure-summaries"] = {
    "task": "keyvault.flush_login_failure_summaries", "schedule": 60.0,
}

# After login without a safe ?next=, open the console, not Django's /accounts/profile/.
LOGIN_REDIRECT_URL = "console-home"

# SQLite keeps sessions, TOTP secrets and the audit log in one local file: production
# runs on PostgreSQL unless the operator opts in, knowingly (check --deploy still warns).
if (not DEBUG and DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3"
        and not env.bool("HMD_ALLOW_SQLITE_IN_PRODUCTION", default=False)):
    raise ImproperlyConfigured(
        "HMD_DEBUG=false needs HMD_DATABASE_URL (PostgreSQL); to run production on SQLite anyway, "
        "set HMD_ALLOW_SQLITE_IN_PRODUCTION=true"
    )
# == end of Security hardening ==================================================
