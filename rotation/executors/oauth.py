"""OAuth/OIDC client secrets: a guided rotation with an overlap window.

Keyvault cannot make a client secret: the identity provider does. The run guides
a person through the steps IdPs support for overlap (two secrets valid at once):

1. create a second secret at the IdP (manual tick, with evidence);
2. hand it to Keyvault (console or ``provide_secret_value``), which stores it in
   the source as a new version;
3. deploy: applications re-read the secret (manual tick);
4. Keyvault verifies a real client-credentials token request with the new secret
   against the configured token endpoint;
5. after the overlap window (the policy's grace period) a person revokes the old
   secret at the IdP; ticking that earlier is refused. Keyvault then checks that the
   old secret is really refused by the token endpoint before completing.

An **emergency** run (leaked secret) has no overlap window and lets a person **revoke
now**: ``idp.revoke`` may be ticked at any point, even before the new secret exists
(applications then fail until it is deployed — the price of shutting out whoever holds
the leaked one); a current secret the IdP already refuses is not an error then. The
check that the old secret is refused still runs before the run completes.

Config (:attr:`OAuthClientSecretExecutor.schema`): ``token_endpoint`` (https, or http on localhost; either way listed in
``HMD_OUTBOUND_ALLOWLIST``, see :mod:`rotation.executors.outbound`; a redirect is refused, never followed), ``client_id``, ``scope``
(optional), ``auth_method``: ``client_secret_basic`` (default) or ``client_secret_post``.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.parse
import urllib.request
from datetime import timedelta

from rotation.executors import outbound
from rotation.executors.base import Context, Executor, ExecutorError, VerificationFailed, WaitingForPerson
from rotation.executors.schema import CHOICE, TEXT, ConfigSchema, Field, printable, token_url

TOKEN_TIMEOUT = 10.0


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is the endpoint's answer, never followed: urllib would repeat the request (and its
    ``Authorization`` header) to wherever ``Location`` points, outside ``HMD_OUTBOUND_ALLOWLIST``."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_opener = urllib.request.build_opener(_NoRedirect)
#: For other executors that send a credential over HTTP (``rotation.executors.apitoken``).
no_redirect_opener = _opener


def token_request(endpoint: str, client_id: str, client_secret: str, *, scope: str = "",
                  auth_method: str = "client_secret_basic") -> tuple[bool, str]:
    """A client-credentials grant; returns ``(accepted, detail)``. The secret never appears in ``detail``."""
    form = {"grant_type": "client_credentials"}
    if scope:
        form["scope"] = scope
    headers = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}
    if auth_method == "client_secret_post":
        form.update(client_id=client_id, client_secret=client_secret)
    else:  # RFC 6749 §2.3.1: both parts form-urlencoded, then Basic
        pair = f"{urllib.parse.quote(client_id, safe='')}:{urllib.parse.quote(client_secret, safe='')}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
    request = urllib.request.Request(endpoint, data=urllib.parse.urlencode(form).encode(), headers=headers, method="POST")
    try:
        with _opener.open(request, timeout=TOKEN_TIMEOUT) as response:  # noqa: S310 - allowlisted endpoint, no redirects
            body = json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            error = json.loads(exc.read() or b"{}").get("error", "")
        except ValueError:
            error = ""
        return False, f"HTTP {exc.code} {error}".strip()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise VerificationFailed(f"token endpoint unreachable: {getattr(exc, 'reason', exc)}") from None
    if not body.get("access_token"):
        return False, "HTTP 200 without an access_token"
    return True, f"HTTP 200, token_type {body.get('token_type', '?')}, expires_in {body.get('expires_in', '?')}"


class OAuthClientSecretExecutor(Executor):
    rotation_period = timedelta(days=180)
    grace_period = timedelta(days=7)  # the overlap window before the old secret is revoked at the IdP
    auto_rotate = False  # a person hands over each new secret
    schema = ConfigSchema((
        Field("token_endpoint", TEXT, "the IdP's token URL; https (http only on localhost), in "
              "HMD_OUTBOUND_ALLOWLIST", required=True, check=token_url, max_length=2000, form="URL"),
        Field("client_id", TEXT, "the client's id at the IdP", required=True),
        Field("scope", TEXT, "scope asked for in the verification token request", check=printable,
              max_length=1000),
        Field("auth_method", CHOICE, "how the secret is sent (RFC 6749 §2.3.1)", default="client_secret_basic",
              choices=("client_secret_basic", "client_secret_post")),
    ))

    def validate_config(self, config: dict) -> dict:
        options = super().validate_config(config)
        outbound.require_url(options["token_endpoint"], what="token_endpoint")
        return options

    def _request(self, ctx: Context, secret_value: str, *, step: str) -> tuple[bool, str]:
        cfg = ctx.options
        # Checked again before every request: the allowlist may have shrunk since the secret was saved.
        outbound.require_url(ctx.config("token_endpoint"), what="token_endpoint", ctx=ctx, step=step)
        return token_request(ctx.config("token_endpoint"), ctx.config("client_id"), secret_value,
                             scope=cfg.get("scope", ""), auth_method=cfg["auth_method"])

    def precheck(self, ctx: Context) -> None:
        current = ctx.read()
        ctx.state["previous_version"] = current.version
        ctx.tick("precheck.source", f"version {current.version} read from {ctx.secret.source}")
        accepted, detail = self._request(ctx, current.value, step="precheck.token")
        if not accepted and ctx.run.kind == "emergency":
            # Revoke now: in an emergency the leaked secret may be revoked at the IdP before the new one exists.
            ctx.tick("precheck.token", f"the current secret is already refused ({detail}): revoked at the IdP")
            return
        if not accepted:
            raise ExecutorError(f"the current secret is already refused by the token endpoint ({detail})")
        ctx.tick("precheck.token", f"token request with the current secret: {detail}")

    def rotate(self, ctx: Context) -> None:
        ctx.require("idp.create", "create a second client secret at the identity provider, then tick 'idp.create'")
        if not ctx.state.get("new_version"):
            raise WaitingForPerson("store", "hand the new client secret to Keyvault (Provide new value on the run)")
        ctx.require("deploy", "deploy: let the applications re-read the secret, then tick 'deploy'")

    def accept_value(self, ctx: Context, value: str, *, actor) -> None:
        if not ctx.step_done("idp.create"):
            raise ExecutorError("tick 'idp.create' (second secret created at the IdP) first")
        if ctx.state.get("new_version"):
            raise ExecutorError("the new secret is already stored; roll back the run to start again")
        if ctx.read(version=ctx.state["previous_version"]).value == value:
            raise ExecutorError("that is the current secret; create a new one at the IdP")
        written = ctx.write(value)
        ctx.state["new_version"] = written.version
        ctx.tick("store", f"stored as version {written.version} by {actor.name}", actor=actor)

    def verify(self, ctx: Context) -> None:
        current = ctx.read()
        if current.version != ctx.state.get("new_version"):
            raise VerificationFailed("the source no longer holds the new secret as current")
        accepted, detail = self._request(ctx, current.value, step="verify.token")
        if not accepted:
            raise VerificationFailed(f"the token endpoint refused the new secret ({detail})")
        ctx.tick("verify.token", f"token request with the new secret: {detail}")

    def before_manual_tick(self, run, key: str, *, now) -> None:
        if key == "deploy" and not (run.executor_state or {}).get("new_version"):
            raise ExecutorError("store the new secret in Keyvault before deploying it")
        if key == "idp.revoke" and run.kind == "emergency":
            return  # revoke now: a leaked secret is revoked at once, outage or not
        if key == "idp.revoke":
            if run.state != "retiring" or not run.retire_after:
                raise ExecutorError("the old secret is revoked only after the new one is verified")
            if run.retire_after > now:
                raise ExecutorError(f"the overlap window lasts until {run.retire_after:%Y-%m-%d %H:%M} UTC; "
                                    "revoke the old secret at the IdP after that")

    def retire(self, ctx: Context) -> None:
        ctx.require("idp.revoke", "the overlap window is over: revoke the old secret at the IdP, then tick 'idp.revoke'")
        old = ctx.read(version=ctx.state["previous_version"])
        accepted, detail = self._request(ctx, old.value, step="verify.revoked")
        if accepted:
            from rotation.models import RunStep

            RunStep.objects.filter(run=ctx.run, key="idp.revoke").update(status=RunStep.Status.PENDING)
            raise WaitingForPerson("idp.revoke", "the IdP still accepts the old secret: revoke it, then tick 'idp.revoke' again")
        ctx.tick("verify.revoked", f"token request with the old secret refused: {detail}")
        if ctx.source().writable:
            ctx.source().delete_version(ctx.secret.path, ctx.state["previous_version"])
        ctx.tick("retire", f"old secret (version {ctx.state['previous_version']}) revoked and removed from the source")
