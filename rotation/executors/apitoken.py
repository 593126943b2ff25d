"""Keyvault's own API client tokens: a new token with an overlap, delivered, proven by a real API call.

Config: ``client`` (the API client, required; it must exist and be enabled), ``api_url``
(Keyvault's URL as the application reaches it, required; in ``HMD_OUTBOUND_ALLOWLIST``) and
``overlap_hours`` (how long the previous token keeps working, default 24, at most the service's
bound of 366 days). The token itself lives where the managed secret says (its source and path),
which is where the application reads it. Tokens are issued and revoked only through
``keyvault.api.services`` (audited there); this module never writes an ``ApiToken`` row.

1. precheck: the current value is a live token of the client, and its newest (a rotation stops
   older ones at once, so a source still holding one would cut the application off); the
   token's id and expiry are recorded, never the value;
2. rotate: the service issues a new token, the previous one now expiring after the overlap
   (an **emergency** run: every other token is revoked at once, the client stays); it is
   written as a new version of the secret;
3. verify: ``GET <api_url>/api/v1/keks`` with the new token answers 200 — over HTTP, because
   the worker running this may share the database with the web processes yet not their path:
   the call proves the token works where the application sends it (proxy, TLS, web processes);
4. retire, at the end of the overlap (not the policy's grace period: the token's expiry is the
   overlap): the previous token is revoked, so it is refused even if its expiry were lifted.

A failed run revokes the new token, gives the previous one back its old expiry and puts the
source back: the application keeps its working token, nothing is lost. A rollback before
retirement does the same. An emergency run is not rolled back to a leaked token.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from datetime import datetime, timedelta

from django.utils import timezone

from keyvault.api import services as api
from keyvault.models import ApiClient
from rotation.exceptions import ConfigFieldError
from rotation.executors import outbound
from rotation.executors.base import Context, Executor, ExecutorError, VerificationFailed, fingerprint
from rotation.executors.oauth import TOKEN_TIMEOUT, no_redirect_opener
from rotation.executors.schema import INTEGER, TEXT, ConfigSchema, Field, token_url

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,99}$")
MAX_OVERLAP_HOURS = int(api.MAX_OVERLAP.total_seconds() // 3600)


def client_name(value: str) -> None:
    if not _NAME.match(value):
        raise ValueError(f"{value!r} is not an API client name")


def probe(api_url: str, token: str) -> tuple[int, str]:
    """``GET /api/v1/keks`` with ``token``: the HTTP status and a short detail (never the token)."""
    url = api_url.rstrip("/") + "/api/v1/keks"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}", "Accept": "application/json"})
    try:
        with no_redirect_opener.open(request, timeout=TOKEN_TIMEOUT) as response:  # noqa: S310 - allowlisted, no redirects
            body = json.loads(response.read() or b"{}")
            return response.status, f"{len(body.get('keks') or [])} KEK(s) listed"
    except urllib.error.HTTPError as exc:
        try:
            problem = json.loads(exc.read() or b"{}").get("type", "")
        except ValueError:
            problem = ""
        return exc.code, problem
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise VerificationFailed(f"the API at {api_url} is unreachable: {getattr(exc, 'reason', exc)}") from None


class ApiClientTokenExecutor(Executor):
    schema = ConfigSchema((
        Field("client", TEXT, "the API client whose token this is (manage.py api client list)", required=True,
              check=client_name, form="name"),
        Field("api_url", TEXT, "Keyvault's URL as applications reach it; https (http only on localhost), in "
              "HMD_OUTBOUND_ALLOWLIST", required=True, check=token_url, max_length=2000, form="URL"),
        Field("overlap_hours", INTEGER, "how long the previous token keeps working after a rotation",
              default=24, minimum=1, maximum=MAX_OVERLAP_HOURS),
    ))
    rotation_period = timedelta(days=90)
    grace_period = timedelta(hours=24)  # shown on the policy; the retirement follows overlap_hours

    def validate_config(self, config: dict) -> dict:
        options = super().validate_config(config)
        client = ApiClient.objects.filter(name=options["client"]).first()
        if client is None:
            raise ConfigFieldError("client", f"no API client named {options['client']!r}")
        if not client.enabled:
            raise ConfigFieldError("client", f"API client {options['client']!r} is revoked")
        outbound.require_url(options["api_url"], what="api_url")
        return options

    def _overlap(self, ctx: Context) -> timedelta:
        return timedelta(0) if ctx.run.kind == "emergency" else timedelta(hours=ctx.options["overlap_hours"])

    def retire_delay(self, ctx: Context) -> timedelta:
        return self._overlap(ctx)

    def _emergency(self, ctx: Context) -> bool:
        return ctx.run.kind == "emergency"

    # -- phases -----------------------------------------------------------------------
    def precheck(self, ctx: Context) -> None:
        name = ctx.options["client"]
        current = ctx.read()
        ctx.state["previous_version"] = current.version
        row = api.token_row(current.value)
        if row is None or row.client.name != name:
            raise ExecutorError(f"secret {ctx.secret.name}: its current value is not a token of API client {name!r}")
        ctx.state.update(previous_token=row.pk, previous_prefix=row.prefix,
                         previous_expires_at=row.expires_at.isoformat() if row.expires_at else None)
        usable = row.revoked_at is None and (row.expires_at is None or row.expires_at > ctx.now)
        newest = row.client.tokens.filter(revoked_at__isnull=True).order_by("-created_at", "-pk").first()
        if self._emergency(ctx):
            ctx.tick("precheck.source", f"version {current.version} holds token {row.prefix}… of client {name!r} "
                                        f"({'still usable' if usable else 'no longer usable'}); it is revoked next")
            return
        if not usable:
            raise ExecutorError(f"secret {ctx.secret.name}: token {row.prefix}… of client {name!r} is revoked or "
                                "expired; start an emergency run, or store the client's working token first")
        if newest is not None and newest.pk != row.pk:
            raise ExecutorError(f"secret {ctx.secret.name}: client {name!r} has a newer token ({newest.prefix}…) than "
                                "the one stored; a rotation would stop the stored one at once")
        ctx.tick("precheck.source", f"version {current.version} is the newest usable token ({row.prefix}…) "
                                    f"of client {name!r}")

    def rotate(self, ctx: Context) -> None:
        if ctx.state.get("new_version"):
            return
        self._revoke_unstored(ctx)
        name = ctx.options["client"]
        ctx.state["issuing_since"] = timezone.now().isoformat()  # rows carry real creation times
        ctx.save()  # before the token exists: a worker killed now leaves a mark to find the token by
        token = api.rotate_token(name, actor=ctx.actor, overlap=self._overlap(ctx), now=ctx.now)
        row = api.token_row(token)
        ctx.state.update(new_token=row.pk, new_prefix=row.prefix)
        ctx.save()
        if self._emergency(ctx):
            revoked = api.revoke_tokens(name, actor=ctx.actor, keep=row.pk,
                                        reason=f"emergency rotation, run #{ctx.run.pk}")
            ctx.tick("rotate.revoke", f"every other token of client {name!r} revoked "
                                      f"({', '.join(p + '…' for p in revoked) or 'none was live'}); the client stays")
        written = ctx.write(token)
        ctx.state.update(new_version=written.version, new_value=fingerprint(token))
        overlap = "none" if self._emergency(ctx) else f"until {(ctx.now + self._overlap(ctx)).isoformat()}"
        ctx.tick("rotate.install", f"token {row.prefix}… issued for client {name!r} and written as version "
                                   f"{written.version}; the previous one works {overlap}")

    def _revoke_unstored(self, ctx: Context) -> None:
        """Tokens an earlier attempt issued but never stored: their value is gone, revoke them."""
        since = ctx.state.pop("issuing_since", None)
        unstored = [ctx.state.pop("new_token")] if ctx.state.get("new_token") else []
        if since:
            client = ApiClient.objects.get(name=ctx.options["client"])
            unstored += client.tokens.filter(created_at__gte=datetime.fromisoformat(since), revoked_at__isnull=True
                                             ).exclude(pk=ctx.state.get("previous_token")).values_list("pk", flat=True)
        if unstored:
            api.revoke_tokens(ctx.options["client"], actor=ctx.actor, token_ids=sorted(set(unstored)),
                              reason=f"issued by an interrupted attempt of run #{ctx.run.pk}, never delivered")
        ctx.state.pop("new_prefix", None)

    def verify(self, ctx: Context) -> None:
        current = ctx.read()
        if current.version != ctx.state["new_version"] or fingerprint(current.value) != ctx.state["new_value"]:
            raise VerificationFailed("reading the secret back did not return the new token")
        url = ctx.options["api_url"]
        # Checked again before the call: the allowlist may have shrunk since the secret was saved.
        outbound.require_url(url, what="api_url", ctx=ctx, step="verify.api")
        status, detail = probe(url, current.value)
        if status != 200:
            ctx.tick("verify.api", f"GET /api/v1/keks with the new token: HTTP {status} {detail}".strip(), failed=True)
            raise VerificationFailed(f"the API refused the new token: HTTP {status} {detail}".strip())
        ctx.tick("verify.api", f"GET {url.rstrip('/')}/api/v1/keks as client {ctx.options['client']!r} with the new "
                               f"token: HTTP 200, {detail}")

    def retire(self, ctx: Context) -> None:
        name = ctx.options["client"]
        revoked = api.revoke_tokens(name, actor=ctx.actor, token_ids=[ctx.state["previous_token"]],
                                    reason=f"end of the overlap, run #{ctx.run.pk}")
        ctx.tick("retire", f"previous token {ctx.state['previous_prefix']}… "
                           f"{'revoked' if revoked else 'was revoked already'}")

    def _withdraw_new(self, ctx: Context, why: str) -> str:
        """Revoke the new token and give the previous one back its expiry; the note for the audit trail."""
        name, new = ctx.options["client"], ctx.state.get("new_token")
        if not new:
            return ""
        api.revoke_tokens(name, actor=ctx.actor, token_ids=[new], reason=f"{why}, run #{ctx.run.pk}")
        ctx.state.pop("new_token", None)
        ctx.state.pop("issuing_since", None)
        note = f"the new token {ctx.state.get('new_prefix', '')}… revoked"
        if self._emergency(ctx):
            return note
        expires = ctx.state.get("previous_expires_at")
        back = api.reinstate_token(name, token_id=ctx.state["previous_token"], actor=ctx.actor, reason=why,
                                   expires_at=datetime.fromisoformat(expires) if expires else None)
        return note + ("; the previous token works as before" if back else "; the previous token was revoked meanwhile")

    def rollback(self, ctx: Context) -> str:
        if self._emergency(ctx):
            raise ExecutorError("an emergency rotation is not rolled back to a revoked token; resume it instead")
        note = super().rollback(ctx)
        withdrawn = self._withdraw_new(ctx, "rotation rolled back")
        return f"{note}; {withdrawn}" if withdrawn else note

    def on_failure(self, ctx: Context, exc: Exception) -> str:
        if ctx.state.get("verified"):
            return super().on_failure(ctx, exc)
        # an emergency run leaves the leaked tokens revoked and the source as it is: there is nothing to go back to
        note = "the leaked tokens stay revoked" if self._emergency(ctx) else super().on_failure(ctx, exc)
        try:
            withdrawn = self._withdraw_new(ctx, "rotation failed before the new token was verified")
        except Exception as cleanup:  # noqa: BLE001 - the run has failed already; say what is left
            return f"{note}; the unverified token {ctx.state.get('new_prefix', '')}… may still be live: {cleanup}"
        return f"{note}; {withdrawn}" if withdrawn else note
