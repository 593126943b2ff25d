"""PostgreSQL credentials: zero-downtime two-user (blue/green) rotation, or single-user with a brief disruption.

**Two users** (Infisical's dual-phase scheme): the secret holds the credentials of
one of two roles with the same privileges, e.g. ``app_blue`` and ``app_green``.
A rotation gives the *inactive* role a new strong password, logs in with it for
real, and only then switches the secret to that role. The previously active role
keeps working for the grace period (applications pick up the new secret at their
own pace), then is locked (``NOLOGIN``, or a random password nobody knows). Each
credential is thus valid for one period plus the grace period, and is never
changed while it is in use.

**Single user** (``mode: single``): the one role gets a new password and the
secret is switched right away; connections already open keep working, but a new
connection made with the old password fails until the application re-reads the
secret — schedule it in a quiet window (see the runbook).

Passwords never reach the server in clear text: ``ALTER ROLE … PASSWORD`` is sent
a SCRAM-SHA-256 verifier computed here, so statement logs hold no password.
Verification is a real login with the new password; where the privileged
connection can read ``pg_authid`` (a superuser) the stored verifier is also
checked against the new password, which still proves the change on servers that
accept logins without a password (``trust``).

Stored value (JSON, the shape AWS Secrets Manager uses for database secrets):
``{"engine": "postgres", "host", "port", "dbname", "username", "password"}``.

Config (:attr:`PostgresCredentialExecutor.schema`): ``host``, ``port`` (5432), ``dbname``,
``usernames`` (two roles) or ``username`` with ``mode: single``; ``admin_dsn`` (a libpq
connection string for a role with CREATEROLE, *without* a password) and optionally
``admin_password_ref`` (``{"source": …, "path": …}``, where the admin password is kept);
``retire``: ``nologin`` (default) or ``password``; ``terminate_sessions``: ``emergency``
(default), ``always`` or ``never``. Every host named (``host`` and those of ``admin_dsn``)
must be listed in ``HMD_OUTBOUND_ALLOWLIST`` (:mod:`rotation.executors.outbound`).

**Sessions.** Locking a role stops new logins only: sessions already open stay open.
At retirement of an **emergency** run (``terminate_sessions: emergency``, the default;
``always`` also does it at planned retirements) the privileged connection ends them with
``pg_terminate_backend``: every session of the old role (blue/green), or, single-user,
every session of the role that started before its password changed. Terminating needs
superuser, or membership of ``pg_signal_backend`` (superuser sessions are never ended).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from datetime import timedelta

from rotation.executors import outbound
from rotation.executors.base import (
    Context,
    CredentialRetired,
    Executor,
    ExecutorError,
    SecretConfigError,
    VerificationFailed,
    WaitingForPerson,
    source_named,
)
from rotation.executors import schema as checks
from rotation.executors.schema import CHOICE, INTEGER, REFERENCE, TEXT, TEXT_LIST, ConfigSchema, Field

SCRAM_ITERATIONS = 4096
CONNECT_TIMEOUT = 5
#: 256 bits of randomness, URL-safe (no quoting trouble in connection strings).
PASSWORD_BYTES = 32
#: How long ``pg_terminate_backend`` waits for each ended session to exit.
SESSION_END_TIMEOUT_MS = 5000


def scram_verifier(password: str, *, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS) -> str:
    """The ``SCRAM-SHA-256$…`` verifier PostgreSQL stores for ``password`` (RFC 7677, ASCII passwords)."""
    salt = salt or secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    stored_key = hashlib.sha256(hmac.new(salted, b"Client Key", hashlib.sha256).digest()).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def scram_matches(verifier: str | None, password: str) -> bool:
    """Whether a stored SCRAM-SHA-256 verifier is the one for ``password``."""
    try:
        scheme, rest = verifier.split("$", 1)
        head, keys = rest.split("$", 1)
        iterations, salt = head.split(":", 1)
        if scheme != "SCRAM-SHA-256":
            return False
        expected = scram_verifier(password, salt=base64.b64decode(salt), iterations=int(iterations))
    except (AttributeError, ValueError):
        return False
    return hmac.compare_digest(expected.rsplit("$", 1)[1], keys)


def _psycopg():
    try:
        import psycopg
        from psycopg import sql
    except ModuleNotFoundError:
        raise SecretConfigError("PostgreSQL rotation needs psycopg (pip install 'psycopg[binary]')") from None
    return psycopg, sql


class PostgresCredentialExecutor(Executor):
    rotation_period = timedelta(days=30)
    schema = ConfigSchema((
        Field("host", TEXT, "the database host applications connect to (libpq: comma list, or a socket folder); "
              "in HMD_OUTBOUND_ALLOWLIST", required=True, check=checks.postgres_hosts, form="host[,host…]"),
        Field("port", INTEGER, "the database port", default=5432, minimum=1, maximum=65535),
        Field("dbname", TEXT, "the database the application connects to", required=True, check=checks.postgres_name),
        Field("mode", CHOICE, "two roles switched in turn (no downtime) or one role whose password changes",
              default="blue_green", choices=("blue_green", "single")),
        Field("usernames", TEXT_LIST, "the two roles with the same privileges, e.g. app_blue, app_green",
              required_if=("mode", "blue_green"), items=(2, 2), unique=True, check=checks.postgres_name, form="roles"),
        Field("username", TEXT, "the one role", required_if=("mode", "single"), check=checks.postgres_name),
        Field("admin_dsn", TEXT, "libpq connection string of a role with CREATEROLE, without password or service; "
              "its hosts in HMD_OUTBOUND_ALLOWLIST", required=True, check=checks.libpq_dsn, max_length=2000,
              form="libpq string"),
        Field("admin_password_ref", REFERENCE, "secret source and path of the admin role's password"),
        Field("retire", CHOICE, "how the old role is locked at retirement: NOLOGIN, or a random password",
              default="nologin", choices=("nologin", "password")),
        Field("terminate_sessions", CHOICE, "when the old role's open sessions are ended (pg_terminate_backend) "
              "at retirement", default="emergency", choices=("emergency", "always", "never")),
    ))

    # -- configuration and connections --------------------------------------------------
    def validate_config(self, config: dict) -> dict:
        options = super().validate_config(config)
        psycopg, _ = _psycopg()
        admin = psycopg.conninfo.conninfo_to_dict(options["admin_dsn"])
        for what, host, port in self._endpoints(options, admin):
            outbound.require("postgresql", host, port, what=what)
        return options

    @staticmethod
    def _endpoints(config: dict, admin: dict) -> list[tuple[str, str, int | None]]:
        """Every server the logins may reach: ``host``/``port``, and each host of ``admin_dsn``.

        Both are read as libpq reads them: a comma-separated list of hosts, each tried in turn
        with the port at the same place (or the one port). A Unix socket (a host starting with
        ``/``, or none: libpq's default) is this machine: ``localhost``.
        :raises SecretConfigError: ``admin_dsn`` names a ``service`` (its hosts are in a file we cannot check).
        """
        if "service" in admin:
            raise SecretConfigError("admin_dsn must name its host, not a service (HMD_OUTBOUND_ALLOWLIST is checked)")
        try:
            port = int(config.get("port") or 5432)
            found = [("host", host, port) for host in _local(str(config["host"]).split(","))]
            hosts = (admin.get("host") or "").split(",")
            addresses = (admin.get("hostaddr") or "").split(",") if admin.get("hostaddr") else []
            ports = [int(p) if p else 5432 for p in (admin.get("port") or "").split(",")]
        except (TypeError, ValueError):
            raise SecretConfigError("port is a number") from None
        for i in range(max(len(hosts), len(addresses))):
            port = ports[i] if i < len(ports) else ports[-1]
            # libpq connects to a slot's hostaddr when given (its host then only names the server for TLS and
            # passwords); a slot with an empty hostaddr connects to its host.
            address = addresses[i] if i < len(addresses) else ""
            if address:
                found.append(("admin_dsn hostaddr", address, port))
            else:
                found += [("admin_dsn host", host, port) for host in _local([hosts[i] if i < len(hosts) else ""])]
        return found

    def _check_outbound(self, ctx: Context, *, admin: bool, step: str) -> None:
        psycopg, _ = _psycopg()
        dsn = psycopg.conninfo.conninfo_to_dict(ctx.config("admin_dsn"))
        for what, host, port in self._endpoints(ctx.options, dsn):
            if admin == what.startswith("admin_dsn"):
                outbound.require("postgresql", host, port, what=what, ctx=ctx, step=step)

    def _single(self, ctx: Context) -> bool:
        return ctx.options["mode"] == "single"

    def _admin(self, ctx: Context, *, step: str = ""):
        psycopg, _ = _psycopg()
        self._check_outbound(ctx, admin=True, step=step)
        password = None
        ref = ctx.options.get("admin_password_ref")
        if ref:
            password = source_named(ref["source"]).read(ref["path"]).value
        try:
            return psycopg.connect(ctx.config("admin_dsn"), password=password, autocommit=True,
                                   connect_timeout=CONNECT_TIMEOUT)
        except psycopg.OperationalError as exc:
            raise ExecutorError(f"privileged connection failed: {_first_line(exc)}") from None

    def _login(self, ctx: Context, username: str, password: str) -> str:
        """A real login as ``username``; returns ``current_user`` as the server reports it."""
        psycopg, _ = _psycopg()
        cfg = ctx.options
        self._check_outbound(ctx, admin=False, step="")
        try:
            with psycopg.connect(host=cfg["host"], port=cfg["port"], dbname=cfg["dbname"],
                                 user=username, password=password, connect_timeout=CONNECT_TIMEOUT) as conn:
                return conn.execute("SELECT current_user").fetchone()[0]
        except psycopg.OperationalError as exc:
            raise VerificationFailed(f"login as {username} failed: {_first_line(exc)}") from None

    def _set_password(self, admin, username: str, password: str, *, login: bool = True) -> None:
        _, sql = _psycopg()
        statement = sql.SQL("ALTER ROLE {} WITH {} PASSWORD {}").format(
            sql.Identifier(username), sql.SQL("LOGIN" if login else "NOLOGIN"), sql.Literal(scram_verifier(password)))
        admin.execute(statement)

    def _stored_verifier_matches(self, admin, username: str, password: str) -> bool | None:
        """True/False if ``pg_authid`` is readable (superuser), else None."""
        psycopg, _ = _psycopg()
        try:
            row = admin.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", [username]).fetchone()
        except psycopg.errors.InsufficientPrivilege:
            return None
        return bool(row) and scram_matches(row[0], password)

    def _document(self, ctx: Context, username: str, password: str) -> str:
        cfg = ctx.options
        return json.dumps({"engine": "postgres", "host": cfg["host"], "port": cfg["port"],
                           "dbname": cfg["dbname"], "username": username, "password": password})

    def _parse(self, value: str) -> dict:
        try:
            document = json.loads(value)
            document["username"], document["password"]  # noqa: B018 - both required
        except (ValueError, TypeError, KeyError):
            raise ExecutorError("the stored value is not a JSON database secret with username and password") from None
        return document

    # -- phases -----------------------------------------------------------------------------
    def precheck(self, ctx: Context) -> None:
        current = ctx.read()
        document = self._parse(current.value)
        users = [ctx.config("username")] if self._single(ctx) else list(ctx.config("usernames"))
        if document["username"] not in users:
            raise ExecutorError(f"the secret holds role {document['username']!r}, not one of {users}")
        ctx.state.update(previous_version=current.version, previous_user=document["username"])
        ctx.tick("precheck.source", f"version {current.version} read; active role {document['username']}")
        with self._admin(ctx, step="precheck.admin") as admin:
            rows = admin.execute(
                "SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", [users]).fetchall()
            missing = set(users) - {name for (name,) in rows}
            if missing:
                raise ExecutorError(f"role(s) {sorted(missing)} do not exist")
            can = admin.execute(
                "SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user").fetchone()[0]
            if not can:
                raise ExecutorError("the privileged connection's role lacks CREATEROLE")
            me = admin.execute("SELECT current_user").fetchone()[0]
        ctx.tick("precheck.admin", f"privileged connection as {me}; roles {', '.join(users)} exist")

    def rotate(self, ctx: Context) -> None:
        if ctx.state.get("new_version"):
            return
        if self._single(ctx):
            return self._rotate_single(ctx)
        users = list(ctx.config("usernames"))
        previous = ctx.state["previous_user"]
        target = users[1] if previous == users[0] else users[0]
        password = secrets.token_urlsafe(PASSWORD_BYTES)
        with self._admin(ctx) as admin:
            self._set_password(admin, target, password)
            ctx.tick("rotate.password", f"{target} has a new 256-bit password (sent as a SCRAM-SHA-256 verifier) and LOGIN")
            stored = self._stored_verifier_matches(admin, target, password)
        if stored is False:
            raise VerificationFailed(f"pg_authid does not hold the new password of {target}")
        user = self._login(ctx, target, password)
        ctx.tick("rotate.login", f"logged in as {user} with the new password" +
                 ("; pg_authid verifier matches" if stored else "; pg_authid not readable by the admin role"))
        written = ctx.write(self._document(ctx, target, password))
        ctx.state.update(new_user=target, new_version=written.version, verifier_checked=bool(stored))
        ctx.tick("rotate.switch", f"version {written.version} makes {target} active; {previous} stays valid "
                                  f"until retirement")

    def _rotate_single(self, ctx: Context) -> None:
        user = ctx.state["previous_user"]
        password = secrets.token_urlsafe(PASSWORD_BYTES)
        with self._admin(ctx) as admin:
            self._set_password(admin, user, password)
            # Sessions that began before this instant logged in with the old password (ended in an emergency).
            changed_at = admin.execute("SELECT statement_timestamp()").fetchone()[0]
            ctx.state.update(password_changed=True, password_changed_at=changed_at.isoformat())
            ctx.save()
            ctx.tick("rotate.password", f"{user} has a new 256-bit password (sent as a SCRAM-SHA-256 verifier)")
            stored = self._stored_verifier_matches(admin, user, password)
        written = ctx.write(self._document(ctx, user, password))
        ctx.state.update(new_user=user, new_version=written.version, verifier_checked=bool(stored))
        ctx.tick("rotate.switch", f"version {written.version} holds the new password; new connections with the old one fail")
        if stored is False:
            raise VerificationFailed(f"pg_authid does not hold the new password of {user}")
        ctx.tick("rotate.login", f"logged in as {self._login(ctx, user, password)} with the new password")

    def verify(self, ctx: Context) -> None:
        document = self._parse(ctx.read().value)
        if document["username"] != ctx.state["new_user"]:
            raise VerificationFailed("the source does not hold the new credential")
        user = self._login(ctx, document["username"], document["password"])
        with self._admin(ctx) as admin:
            stored = self._stored_verifier_matches(admin, document["username"], document["password"])
        if stored is False:
            raise VerificationFailed("the password in the source is not the one PostgreSQL holds")
        ctx.tick("verify.login", f"logged in as {user} with the credential read back from {ctx.secret.source}")

    def retire(self, ctx: Context) -> None:
        if self._single(ctx):
            self._end_sessions(ctx, ctx.state["previous_user"], before=ctx.state.get("password_changed_at"))
            ctx.tick("retire", "single-user mode: the old password stopped working at the switch")
            return
        old = ctx.state["previous_user"]
        if old == ctx.state.get("new_user"):
            return
        if self._parse(ctx.read().value)["username"] == old:
            # A later (emergency) run switched back to this role: locking it now would cut off the live credential.
            ctx.tick("retire", f"skipped: {old} is the active role again (a later rotation switched back)")
            return
        _, sql = _psycopg()
        mode = ctx.options["retire"]
        with self._admin(ctx) as admin:
            if mode == "password":
                self._set_password(admin, old, secrets.token_urlsafe(PASSWORD_BYTES))
                note = f"{old}'s password reset to a random value nobody holds"
            else:
                admin.execute(sql.SQL("ALTER ROLE {} WITH NOLOGIN").format(sql.Identifier(old)))
                note = f"{old} set to NOLOGIN (it becomes the inactive role of the next rotation)"
            # Recorded at once: a rollback of a run that fails from here on must know the old credential is locked.
            ctx.state["retired"] = mode
            ctx.save()
            can_login = admin.execute("SELECT rolcanlogin FROM pg_roles WHERE rolname = %s", [old]).fetchone()[0]
        self._end_sessions(ctx, old)  # after the lock, so an ended session cannot log in again
        ctx.tick("retire", note + ("" if can_login else "; rolcanlogin is false"))

    def _end_sessions(self, ctx: Context, role: str, *, before: str | None = None) -> None:
        """End the open sessions of the retired credential (``terminate_sessions``), or wait for a person to.

        Locking a role or changing its password stops new logins only. In an emergency the
        sessions an attacker may hold must go too: ``pg_terminate_backend`` on every session
        of ``role`` (single-user: those that began ``before`` the password changed).
        :raises WaitingForPerson: the admin role may not signal them (needs ``pg_signal_backend``).
        """
        when = ctx.options["terminate_sessions"]
        if when == "never" or (when == "emergency" and ctx.run.kind != "emergency"):
            return
        if ctx.step_done("retire.sessions") or ctx.step_done("sessions.manual"):
            return
        psycopg, _ = _psycopg()
        where = "usename = %s AND pid <> pg_backend_pid()" + (" AND backend_start < %s::timestamptz" if before else "")
        params = [role, before] if before else [role]
        with self._admin(ctx, step="retire.sessions") as admin:
            try:
                ended = admin.execute(
                    f"SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, {SESSION_END_TIMEOUT_MS})) "  # noqa: S608
                    f"FROM pg_stat_activity WHERE {where}", params).fetchone()[0]
            except psycopg.errors.InsufficientPrivilege as exc:
                raise WaitingForPerson("sessions.manual", (
                    f"the admin role may not end {role}'s sessions ({_first_line(exc)}): as a superuser run "
                    f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}', "
                    "then tick 'sessions.manual'")) from None
            left = admin.execute(f"SELECT count(*) FROM pg_stat_activity WHERE {where}", params).fetchone()[0]  # noqa: S608
        if left:
            raise ExecutorError(f"{left} session(s) of {role} are still open after pg_terminate_backend")
        scope = f"that began before its password changed ({before})" if before else "of the old role"
        ctx.tick("retire.sessions", f"{ended} session(s) of {role} {scope} ended with pg_terminate_backend; none left")

    def rollback(self, ctx: Context) -> str:
        """Make the previous credential current again; after retirement only where it can still log in.

        :raises CredentialRetired: the old role's password was replaced by a random one (``retire: password``).
        """
        retired = ctx.state.get("retired")
        if retired == "password":
            raise CredentialRetired(
                f"{ctx.state.get('previous_user')}'s password was replaced by a random value at retirement "
                "(retire: password), so the previous secret version no longer logs in; the source was left as it is. "
                "Start a new rotation instead (python manage.py rotation start --secret NAME)"
            )
        unlocked = ""
        if retired:
            _, sql = _psycopg()
            old = ctx.state["previous_user"]
            with self._admin(ctx) as admin:
                admin.execute(sql.SQL("ALTER ROLE {} WITH LOGIN").format(sql.Identifier(old)))
            ctx.state.pop("retired")
            ctx.save()
            unlocked = f"{old} may log in again (it was set to NOLOGIN at retirement); "
        if self._single(ctx) and ctx.state.get("password_changed"):
            # The old password is in the source's previous version: give it back to the role.
            old = self._parse(ctx.read(version=ctx.state["previous_version"]).value)
            with self._admin(ctx) as admin:
                self._set_password(admin, old["username"], old["password"])
            ctx.state["password_changed"] = False
            if not ctx.state.get("new_version"):
                ctx.tick("rollback.restore", f"{old['username']} has its previous password again")
                return "previous password restored"
        note = super().rollback(ctx)
        ctx.state.pop("new_version", None)
        return unlocked + note

    def on_failure(self, ctx: Context, exc: Exception) -> str:
        if self._single(ctx) and ctx.state.get("password_changed") and not ctx.state.get("verified"):
            try:
                return self.rollback(ctx)
            except Exception as restore_exc:  # noqa: BLE001 - report it; a person must act now
                return f"RESTORING THE OLD PASSWORD FAILED ({type(restore_exc).__name__}); reset it by hand"
        if not self._single(ctx):
            if ctx.state.get("new_version") and not ctx.state.get("verified"):
                return super().on_failure(ctx, exc)
            return f"the active role {ctx.state.get('previous_user', '?')} and its password were not changed"
        return super().on_failure(ctx, exc)


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _local(hosts: list[str]) -> list[str]:
    """Hosts as the allowlist sees them: a Unix socket folder, or no host (libpq's default), is ``localhost``."""
    return ["localhost" if not host or host.startswith("/") else host for host in hosts]
