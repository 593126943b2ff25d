"""Which endpoints rotation executors may contact: the operator's ``HMD_OUTBOUND_ALLOWLIST``.

A managed secret's configuration is written by a Key administrator, and executors
send real credentials to the endpoints it names (an OAuth token request carries the
client secret; a PostgreSQL login carries a password; a TLS handshake tells a server
which name we expect). Without a limit, whoever edits a secret's configuration
chooses where a credential goes. So every endpoint an executor contacts must match
an entry the *operator* set in the environment, where a console user cannot change it:

* OAuth/OIDC: ``token_endpoint`` (scheme ``http``/``https``);
* TLS: ``endpoint`` ``host:port`` of the handshake (scheme ``tls``);
* PostgreSQL: ``host``/``port`` of the login, and every ``host``/``hostaddr``/``port``
  of ``admin_dsn`` (scheme ``postgresql``; a ``service=`` entry is refused, since it
  names hosts in a file we cannot see).

Entries, comma-separated: ``host`` (any port), ``host:port``, ``[v6]:port``,
``scheme://host[:port]``, ``*.suffix`` (sub-domains only), an IP network in CIDR
form (``10.0.0.0/8``), or ``*`` (everything: not for production). Names are matched
as configured, case-insensitively; the check happens when the secret is registered
or changed (``validate_config``) and again right before each connection, so a secret
saved under an older list is still refused. A refusal is :class:`OutboundNotAllowed`:
one line naming the endpoint, audited as a failed step of the run.

Default: nothing with ``HMD_DEBUG=false``; loopback only (``localhost``,
``127.0.0.0/8``, ``::1``) in development.
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from dataclasses import dataclass

from keyvault.audit import events
from rotation.executors.base import SecretConfigError

SETTING = "HMD_OUTBOUND_ALLOWLIST"


class OutboundNotAllowed(SecretConfigError):
    """The endpoint is not in HMD_OUTBOUND_ALLOWLIST; nothing was sent to it."""


@dataclass(frozen=True)
class Rule:
    """One allowlist entry."""

    scheme: str | None = None
    host: str = ""
    port: int | None = None
    #: ``*.suffix``: ``host`` holds ``.suffix``
    suffix: bool = False
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    anything: bool = False

    def matches(self, scheme: str, host: str, port: int | None) -> bool:
        if (self.scheme and self.scheme != scheme) or (self.port is not None and self.port != port):
            return False
        if self.anything:
            return True
        address = _ip(host)
        if self.network is not None:
            return address is not None and address in self.network
        if self.suffix:
            return host.endswith(self.host)
        own = _ip(self.host)
        return host == self.host or (own is not None and own == address)


def _ip(host: str):
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _normal(host: str) -> str:
    return host.strip().strip("[]").rstrip(".").lower()


def parse_rule(text: str) -> Rule:
    """One entry of the allowlist. :raises SecretConfigError: it cannot be read."""
    entry = text.strip()
    bad = SecretConfigError(f"{SETTING} entry {entry!r} is not host, host:port, scheme://host[:port], "
                            "*.suffix or a CIDR network")
    if entry == "*":
        return Rule(anything=True)
    scheme = None
    if "://" in entry:
        parts = urllib.parse.urlsplit(entry)
        if not parts.hostname or parts.path not in ("", "/"):
            raise bad
        try:
            port = parts.port
        except ValueError:
            raise bad from None
        scheme, host = parts.scheme.lower(), parts.hostname
    elif "/" in entry:
        try:
            return Rule(network=ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise bad from None
    elif entry.startswith("[") and "]:" in entry:
        host, _, port_text = entry[1:].partition("]:")
        port = _port(port_text, bad)
    elif entry.count(":") == 1:
        host, _, port_text = entry.partition(":")
        port = _port(port_text, bad)
    else:
        host, port = entry, None
    host = _normal(host)
    if host.startswith("*."):
        return Rule(scheme=scheme, host=host[1:], port=port, suffix=True)
    if not host or "*" in host:
        raise bad
    return Rule(scheme=scheme, host=host, port=port)


def _port(text: str, bad: Exception) -> int:
    if not text.isascii() or not text.isdigit() or not 0 < int(text) < 65536:
        raise bad
    return int(text)


def rules() -> list[Rule]:
    """The allowlist from settings (``OUTBOUND_ALLOWLIST``)."""
    from django.conf import settings

    entries = settings.OUTBOUND_ALLOWLIST
    if isinstance(entries, str):
        entries = entries.split(",")
    return [parse_rule(entry) for entry in entries if entry and entry.strip()]


def is_allowed(scheme: str, host: str, port: int | None) -> bool:
    host = _normal(host)
    return bool(host) and any(rule.matches(scheme, host, port) for rule in rules())


def require(scheme: str, host: str, port: int | None, *, what: str, ctx=None, step: str = "") -> None:
    """Refuse an endpoint outside the allowlist; with ``ctx``, audit the refusal as a failed step of the run.

    :raises OutboundNotAllowed:
    """
    if is_allowed(scheme, host, port):
        return
    shown = f"{scheme}://{_normal(host) or '?'}" + (f":{port}" if port else "")
    error = OutboundNotAllowed(f"{what} {shown} is not in {SETTING}; nothing was sent to it")
    if ctx is not None:
        events.outbound_refused(ctx.secret, actor=ctx.actor, run_id=ctx.run.pk, endpoint=shown, what=what)
        if step:
            ctx.tick(step, str(error), failed=True)
    raise error


def require_url(url: str, *, what: str, ctx=None, step: str = "") -> None:
    """:func:`require` for an http(s) URL. :raises OutboundNotAllowed, SecretConfigError:"""
    parts = urllib.parse.urlsplit(str(url))
    try:
        port = parts.port or {"https": 443, "http": 80}.get(parts.scheme)
    except ValueError:
        raise SecretConfigError(f"{what} has an invalid port") from None
    require(parts.scheme.lower(), parts.hostname or "", port, what=what, ctx=ctx, step=step)
