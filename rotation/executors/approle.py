"""Vault/OpenBao AppRole secret ids: Vault issues a new one, the old one is destroyed after the grace period.

Config: ``role`` (the AppRole role, required), ``mount`` (the AppRole auth mount, default
``approle``), ``vault_source`` (the configured Vault secret source whose login administers the
role, default ``vault``). The secret id itself lives where the managed secret says (its source
and path), like every managed value. Keyvault's identity at Vault needs, under
``auth/<mount>/role/<role>/``: ``read`` on ``role-id`` and ``update`` on ``secret-id``,
``secret-id/lookup`` and ``secret-id-accessor/destroy``.

1. precheck: the current value is a live secret id of the role; its *accessor* is recorded
   (never the value), so it can be destroyed later without being read again;
2. rotate: Vault issues a new secret id (its metadata names the run), written as a new
   version; the old one still works;
3. verify: a login with the role id and the new secret id succeeds (its token is revoked
   at once);
4. retire, after the grace period and once a person has ticked that every consumer restarted
   with the new value: the old secret id is destroyed by its accessor.

Rollback before retirement writes the old value back and destroys the new secret id; a
failed run destroys the new one too, so no unverified credential stays live. Keyvault's
own ``HMD_VAULT_SECRET_ID`` is out of reach of managed secrets (``keyvault.secrets.managed``):
for it, follow docs/ops/keyvault-secrets.md.
"""

from __future__ import annotations

import re
from datetime import timedelta

from keyvault.kms.vault import AppRoleAuth
from keyvault.secrets import get_source
from keyvault.secrets.base import SecretAccessDenied
from rotation.executors.schema import TEXT, ConfigSchema, Field
from rotation.executors.base import Context, Executor, ExecutorError, SecretConfigError, VerificationFailed, fingerprint

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def vault_name(value: str) -> None:
    """A Vault role, mount or source name: letters, digits, ``_ . -``, starting with a letter or digit."""
    if not _NAME.match(value):
        raise ValueError(f"{value!r} is not a Vault name (letters, digits, _ . -)")
CONSUMERS_STEP = "rotate.consumers"


class AppRoleSecretIdExecutor(Executor):
    schema = ConfigSchema((
        Field("role", TEXT, "AppRole role name", required=True, check=vault_name, form="name"),
        Field("mount", TEXT, "AppRole auth mount", default="approle", check=vault_name, form="name"),
        Field("vault_source", TEXT, "configured Vault secret source that administers the role",
              default="vault", check=vault_name, form="name"),
    ))
    rotation_period = timedelta(days=30)
    grace_period = timedelta(hours=1)

    # -- Vault ------------------------------------------------------------------------
    def _options(self, ctx: Context) -> dict:
        return ctx.options

    def _vault(self, ctx: Context):
        name = self._options(ctx)["vault_source"]
        source = get_source(name)
        if not hasattr(source, "api"):
            raise SecretConfigError(f"secret {ctx.secret.name}: secret source {name!r} is not a Vault source")
        return source

    def _role_path(self, ctx: Context, tail: str) -> str:
        options = self._options(ctx)
        return f"auth/{options['mount']}/role/{options['role']}/{tail}"

    def _call(self, ctx: Context, tail: str, payload: dict | None = None, *, what: str, method: str = "POST") -> dict:
        status, body = self._vault(ctx).api(method, self._role_path(ctx, tail), payload, what=what)
        if status in (400, 404):
            errors = "; ".join(body.get("errors") or []) or f"HTTP {status}"
            raise ExecutorError(f"vault refused {what} for role {self._options(ctx)['role']!r}: {errors}")
        return body.get("data") or {}

    def _accessor_of(self, ctx: Context, secret_id: str) -> str:
        data = self._call(ctx, "secret-id/lookup", {"secret_id": secret_id}, what="the secret id lookup")
        accessor = data.get("secret_id_accessor")
        if not accessor:
            raise ExecutorError(f"secret {ctx.secret.name}: its current value is not a live secret id of role "
                                f"{self._options(ctx)['role']!r}")
        return accessor

    def _destroy(self, ctx: Context, accessor: str) -> bool:
        """Destroy a secret id by its accessor; ``False`` if Vault no longer knows it (destroyed already)."""
        status, _ = self._vault(ctx).api("POST", self._role_path(ctx, "secret-id-accessor/lookup"),
                                         {"secret_id_accessor": accessor}, what="the accessor lookup")
        if status in (400, 404):
            return False
        self._call(ctx, "secret-id-accessor/destroy", {"secret_id_accessor": accessor}, what="destroying the secret id")
        return True

    # -- phases -----------------------------------------------------------------------
    def precheck(self, ctx: Context) -> None:
        current = ctx.read()
        ctx.state["previous_version"] = current.version
        ctx.state["previous_accessor"] = self._accessor_of(ctx, current.value)
        self._call(ctx, "role-id", method="GET", what="reading the role id")
        ctx.tick("precheck.source", f"version {current.version} is a live secret id of role {self._options(ctx)['role']!r} "
                                    f"(accessor {ctx.state['previous_accessor']})")

    def rotate(self, ctx: Context) -> None:
        if ctx.state.get("new_version"):
            return
        if ctx.state.get("new_accessor"):
            # issued by an earlier attempt that stopped before storing it: its value is gone, destroy it
            self._destroy(ctx, ctx.state.pop("new_accessor"))
        data = self._call(ctx, "secret-id", {"metadata": f'{{"issued_by": "keyvault", "run": "{ctx.run.pk}"}}'},
                          what="issuing a secret id")
        secret_id, accessor = data.get("secret_id"), data.get("secret_id_accessor")
        if not secret_id or not accessor:
            raise ExecutorError("vault issued no secret id")
        ctx.state["new_accessor"] = accessor
        ctx.save()  # before the value is stored anywhere: a crash now leaves an accessor to destroy
        written = ctx.write(secret_id)
        ctx.state.update(new_version=written.version, new_value=fingerprint(secret_id))
        ctx.tick("rotate.install", f"secret id (accessor {accessor}) issued for role {self._options(ctx)['role']!r} and "
                                   f"written as version {written.version}; the previous one still works")

    def verify(self, ctx: Context) -> None:
        current = ctx.read()
        if current.version != ctx.state["new_version"] or fingerprint(current.value) != ctx.state["new_value"]:
            raise VerificationFailed("reading the secret back did not return the new secret id")
        role_id = self._call(ctx, "role-id", method="GET", what="reading the role id").get("role_id")
        mount = self._options(ctx)["mount"]
        try:
            login = self._vault(ctx).try_login(AppRoleAuth(role_id or "", current.value, mount))
        except SecretAccessDenied as exc:
            raise VerificationFailed(f"a login with the new secret id was refused: {exc}") from None
        ctx.tick("verify.login", f"logged in to auth/{mount} as role {self._options(ctx)['role']!r} with the new secret id "
                                 f"(policies {', '.join(login.get('token_policies') or []) or 'none'}); token revoked")

    def retire(self, ctx: Context) -> None:
        ctx.require(CONSUMERS_STEP, "tick 'rotate.consumers' once every consumer restarted with the new secret id; "
                                    "the old one is destroyed then")
        accessor = ctx.state.get("previous_accessor")
        destroyed = bool(accessor) and self._destroy(ctx, accessor)
        ctx.tick("retire", f"previous secret id (accessor {accessor}) "
                           f"{'destroyed' if destroyed else 'was no longer known to Vault'}")

    def rollback(self, ctx: Context) -> str:
        accessor = ctx.state.get("new_accessor")
        note = super().rollback(ctx)
        if accessor and self._destroy(ctx, accessor):
            ctx.state.pop("new_accessor", None)
            note += f"; the new secret id (accessor {accessor}) destroyed"
        return note

    def on_failure(self, ctx: Context, exc: Exception) -> str:
        note = super().on_failure(ctx, exc)
        accessor = ctx.state.get("new_accessor")
        if accessor and not ctx.state.get("verified"):
            try:
                if self._destroy(ctx, accessor):
                    ctx.state.pop("new_accessor", None)
                    note = f"{note}; the unverified secret id (accessor {accessor}) destroyed".lstrip("; ")
            except Exception as cleanup:  # noqa: BLE001 - the run has failed already; say what is left
                note = f"{note}; the unverified secret id (accessor {accessor}) may still be live: {cleanup}"
        return note
