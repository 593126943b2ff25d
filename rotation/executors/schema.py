"""Configuration schemas of managed secrets: one definition per type, used everywhere.

Each executor declares its configuration as a :class:`ConfigSchema` (its ``schema``
attribute). The same definition

* refuses a bad configuration when a secret is registered or changed — in the
  console's add/change form, in ``manage.py secret add``/``change`` and in
  ``rotation.services.register_secret``/``update_secret`` — with one
  :class:`ConfigFieldError` naming the field (missing, unknown, wrong type, bad
  value);
* gives the executor its values with the defaults filled in (``Context.options``),
  so a default is written down once;
* checks a stored configuration again before every run (a row saved under an
  older, looser schema fails that run with the same message, never a crash);
* renders the tables of ``docs/ops/secrets.md`` and ``manage.py secret schema``
  (a test compares them, so the documentation cannot drift).

Checks that depend on the operator's environment — ``HMD_OUTBOUND_ALLOWLIST``, and
Keyvault's own secrets being out of reach — stay in the executors and
``rotation.managed_secrets``; this module checks the shape and the values.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rotation.exceptions import ConfigFieldError

#: How many characters of a bad value a message quotes.
QUOTE_LIMIT = 60
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

TEXT, INTEGER, TEXT_LIST, CHOICE, REFERENCE = "text", "integer", "list of text", "one of", "reference"


def _quote(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= QUOTE_LIMIT else shown[: QUOTE_LIMIT - 3] + "..."


# -- value checks: each raises ValueError with the problem, the schema names the field ----------


def dns_name(value: str, *, wildcard: bool = False) -> None:
    """A DNS name (RFC 1123 labels) or an IP address; ``*.`` first with ``wildcard``."""
    try:
        ipaddress.ip_address(value)
        return
    except ValueError:
        pass
    name = value[:-1] if value.endswith(".") else value
    if wildcard and name.startswith("*."):
        name = name[2:]
    if not name or len(name) > 253 or not all(_LABEL.match(label) for label in name.split(".")):
        raise ValueError(f"{_quote(value)} is not a DNS name or IP address")


def dns_name_or_wildcard(value: str) -> None:
    dns_name(value, wildcard=True)


def port_number(text: str) -> int:
    if not text.isascii() or not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"port {_quote(text)} is not a number from 1 to 65535")
    return int(text)


def host_port(value: str) -> None:
    """``host:port`` or ``[v6]:port``."""
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
    else:
        host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{_quote(value)} is not host:port")
    dns_name(host)
    port_number(port)


_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def token_url(value: str) -> None:
    """An https URL (http only on localhost), without credentials or fragment."""
    try:
        parts = urllib.parse.urlsplit(value)
        port = parts.port
    except ValueError:
        raise ValueError(f"{_quote(value)} is not a URL with a valid port") from None
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError("must be an https:// URL")
    if parts.scheme == "http" and parts.hostname not in _LOCAL_HOSTS:
        raise ValueError("must be https (http only on localhost)")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not carry credentials (user:password@)")
    if parts.fragment:
        raise ValueError("must not have a #fragment")
    if port == 0:
        raise ValueError("port 0 is not a port")
    dns_name(parts.hostname)


def postgres_hosts(value: str) -> None:
    """A libpq host list: comma-separated names, IP addresses or Unix socket folders."""
    for host in value.split(","):
        if not host.startswith("/"):
            dns_name(host)


def postgres_name(value: str) -> None:
    """A PostgreSQL identifier as the server keeps it: at most 63 bytes, no NUL."""
    if "\x00" in value or len(value.encode()) > 63:
        raise ValueError(f"{_quote(value)} is not a PostgreSQL name (at most 63 bytes)")


def libpq_dsn(value: str) -> None:
    """A libpq connection string naming its hosts, without a password."""
    try:
        from psycopg import Error, conninfo

        parsed = conninfo.conninfo_to_dict(value)
    except ModuleNotFoundError:
        raise ValueError("PostgreSQL rotation needs psycopg (pip install 'psycopg[binary]')") from None
    except (Error, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"not a libpq connection string ({first})") from None
    if "password" in parsed:
        raise ValueError("must not contain a password; use admin_password_ref")
    if "service" in parsed:
        raise ValueError("must name its host, not a service (HMD_OUTBOUND_ALLOWLIST is checked)")
    if parsed.get("host"):
        postgres_hosts(str(parsed["host"]))
    for address in filter(None, str(parsed.get("hostaddr") or "").split(",")):
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise ValueError(f"hostaddr {_quote(address)} is not an IP address") from None
    for port in filter(None, str(parsed.get("port") or "").split(",")):
        port_number(port)


def printable(value: str) -> None:
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters")


# -- the schema --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """One configuration key: its type, whether it is needed, its default and what it means."""

    name: str
    kind: str
    help: str
    required: bool = False
    #: Required when another field has this value, e.g. ``("mode", "single")``.
    required_if: tuple[str, str] | None = None
    default: Any = None
    choices: tuple[str, ...] = ()
    minimum: int | None = None
    maximum: int | None = None
    #: List length bounds (``TEXT_LIST``).
    items: tuple[int, int] = (0, 100)
    unique: bool = False
    max_length: int = 255
    #: Checks one text value (each item of a list); raises ValueError with the problem.
    check: Callable[[str], None] | None = None
    #: How the value is written, for the table (e.g. ``host:port``).
    form: str = ""

    def requirement(self) -> str:
        if self.required:
            return "yes"
        if self.required_if:
            return f"if {self.required_if[0]} is {self.required_if[1]}"
        return "no"

    def type_text(self) -> str:
        if self.kind == CHOICE:
            return " / ".join(f"`{choice}`" for choice in self.choices)
        if self.kind == INTEGER:
            return f"integer {self.minimum}–{self.maximum}"
        if self.kind == TEXT_LIST:
            low, high = self.items
            count = f"{low}" if low == high else f"{low}–{high}"
            return f"list of {count} {self.form or 'text'}"
        if self.kind == REFERENCE:
            return '`{"source": …, "path": …}`'
        return self.form or "text"

    def default_text(self) -> str:
        if self.default is None:
            return ""
        if isinstance(self.default, str):
            return f"`{self.default}`" if self.default else '`""`'
        return f"`{self.default}`"

    # -- validation ------------------------------------------------------------------------
    def clean(self, value: Any, source_names: Callable[[], list[str]]) -> Any:
        """The value if it is valid. :raises ConfigFieldError:"""
        try:
            if self.kind == INTEGER:
                return self._integer(value)
            if self.kind == TEXT_LIST:
                return self._list(value)
            if self.kind == REFERENCE:
                return self._reference(value, source_names)
            return self._text(value)
        except ValueError as exc:
            raise ConfigFieldError(self.name, str(exc)) from None

    def _text(self, value: Any, *, what: str = "") -> str:
        if not isinstance(value, str):
            raise ValueError(f"{what}must be text, not {type(value).__name__}")
        if not value:
            raise ValueError(f"{what}must not be empty")
        if len(value) > self.max_length:
            raise ValueError(f"{what}must be at most {self.max_length} characters")
        if self.kind == CHOICE and value not in self.choices:
            raise ValueError(f"must be one of {', '.join(self.choices)} (got {_quote(value)})")
        printable(value)
        if self.check is not None:
            self.check(value)
        return value

    def _integer(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer, not {type(value).__name__}")
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"must be from {self.minimum} to {self.maximum} (got {value})")
        return value

    def _list(self, value: Any) -> list[str]:
        if not isinstance(value, list):
            raise ValueError(f"must be a list, not {type(value).__name__}")
        low, high = self.items
        if not low <= len(value) <= high:
            raise ValueError(f"must hold {low if low == high else f'{low} to {high}'} item(s), not {len(value)}")
        items = [self._text(item, what=f"item {i + 1} ") for i, item in enumerate(value)]
        if self.unique and len(set(items)) != len(items):
            raise ValueError("items must be different")
        return items

    def _reference(self, value: Any, source_names: Callable[[], list[str]]) -> dict:
        if not isinstance(value, dict):
            raise ValueError(f'must be {{"source": …, "path": …}}, not {type(value).__name__}')
        keys = set(value)
        if keys != {"source", "path"}:
            extra = sorted(map(str, keys - {"source", "path"}))
            raise ValueError(f"unknown key(s) {', '.join(extra)}" if extra else 'needs both "source" and "path"')
        for key in ("source", "path"):
            if not isinstance(value[key], str) or not value[key].strip():
                raise ValueError(f"{key} must be non-empty text")
            printable(value[key])
        configured = source_names()
        if value["source"] not in configured:
            raise ValueError(f"secret source {_quote(value['source'])} is not configured "
                             f"(configured: {', '.join(configured) or 'none'})")
        return {"source": value["source"], "path": value["path"]}


@dataclass(frozen=True)
class ConfigSchema:
    """The configuration of one managed-secret type."""

    fields: tuple[Field, ...] = ()
    #: Checks across fields, after each field is valid: ``rule(options)`` raises ConfigFieldError.
    rules: tuple[Callable[[dict], None], ...] = field(default=())

    def __getitem__(self, name: str) -> Field:
        return next(f for f in self.fields if f.name == name)

    def validate(self, config: Any, *, source_names: Callable[[], list[str]] | None = None) -> dict:
        """The configuration with defaults filled in, if it is valid.

        :param source_names: the configured secret sources (default: the registry's).
        :raises ConfigFieldError: the first problem, naming its field.
        """
        if source_names is None:
            from keyvault.secrets.registry import source_names
        if not isinstance(config, Mapping):
            raise ConfigFieldError("config", f"must be a JSON object, not {type(config).__name__}")
        known = {f.name for f in self.fields}
        unknown = sorted(str(key) for key in config if key not in known)
        if unknown:
            allowed = ", ".join(sorted(known)) or "none"
            raise ConfigFieldError(unknown[0], f"unknown key for this type (known: {allowed})")
        options: dict = {}
        for f in self.fields:
            value = config.get(f.name)
            if value is None or value == "":
                if f.default is not None:
                    options[f.name] = f.default
                continue
            options[f.name] = f.clean(value, source_names)
        for f in self.fields:
            needed = f.required or (f.required_if and options.get(f.required_if[0]) == f.required_if[1])
            if needed and f.name not in options:
                why = f" when {f.required_if[0]} is {f.required_if[1]}" if f.required_if and not f.required else ""
                raise ConfigFieldError(f.name, f"is required{why} ({f.help})")
        for rule in self.rules:
            rule(options)
        return options

    def markdown_table(self) -> str:
        """The table ``docs/ops/secrets.md`` shows for this type."""
        rows = ["| Key | Type | Required | Default | Meaning |", "|---|---|---|---|---|"]
        for f in self.fields:
            rows.append(f"| `{f.name}` | {f.type_text()} | {f.requirement()} | {f.default_text()} | {f.help} |")
        if not self.fields:
            rows.append("| — | | | | no configuration keys |")
        return "\n".join(rows)

    def summary(self) -> str:
        """One line per key, for the console's help text and ``manage.py secret schema``."""
        return "; ".join(f"{f.name}{'*' if f.required else ''} ({f.type_text().replace('`', '')})"
                         for f in self.fields) or "no keys"
