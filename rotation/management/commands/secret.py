"""``manage.py secret <subcommand>`` — register, change, list and check managed secrets.

The console's **Managed secrets** add/change form at the shell: the same services
(``rotation.services.register_secret`` / ``update_secret``), the same configuration
schema per type (``rotation/executors/schema.py``) and the same audit events. Rotating
one is ``manage.py rotation start --secret NAME``.
"""

from __future__ import annotations

import json

from django.core.exceptions import ValidationError
from django.core.management.base import CommandError

from keyvault.management.commands._base import KeyvaultCommand
from keyvault.models import ManagedSecret
from rotation import services
from rotation.executors import EXECUTORS, executor_for
from rotation.management.commands.rotation import secret_named
from rotation.models import format_period, parse_period


def _assignment(text: str) -> tuple[str, object]:
    """``key=value``; the value is read as JSON when it is JSON (``port=5432``, ``usernames=["a","b"]``), else text."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise CommandError(f"--set takes KEY=VALUE, not {text!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key, value


def _config(options, base: dict) -> dict | None:
    """The configuration the options describe (``--config`` replaces, ``--set``/``--unset`` edit), or None if untouched."""
    if options["config"] is None and not options["set"] and not options.get("unset"):
        return None
    config = dict(base)
    if options["config"] is not None:
        try:
            config = json.loads(options["config"])
        except ValueError as exc:
            raise CommandError(f"--config is not JSON: {exc}") from None
        if not isinstance(config, dict):
            raise CommandError("--config is a JSON object, e.g. '{\"length\": 48}'")
    for key, value in map(_assignment, options["set"]):
        config[key] = value
    for key in options.get("unset") or ():
        config.pop(key, None)
    return config


def _validation_message(exc: ValidationError) -> str:
    if hasattr(exc, "message_dict"):
        return "; ".join(f"{name}: {' '.join(messages)}" for name, messages in exc.message_dict.items())
    return " ".join(exc.messages)


class Command(KeyvaultCommand):
    help = "Register, change, list and check managed secrets (the console's Managed secrets pages)."

    def add_arguments(self, parser):
        super().add_arguments(parser)
        sub = parser.add_subparsers(dest="subcommand", required=True)
        types = sorted(EXECUTORS)

        add = sub.add_parser("add", help="Register a managed secret; its configuration is checked against its type's schema.")
        add.add_argument("name")
        add.add_argument("--type", dest="secret_type", required=True, choices=types)
        add.add_argument("--source", required=True, help="A configured secret source: env, file, vault, aws, gcp, k8s.")
        add.add_argument("--path", required=True, help="Where the value lives in that source.")
        change = sub.add_parser("change", help="Change a managed secret (a new source, path or config re-points it).")
        change.add_argument("name")
        change.add_argument("--source")
        change.add_argument("--path")
        change.add_argument("--unset", action="append", default=[], metavar="KEY", help="Remove a config key.")
        for p in (add, change):
            p.add_argument("--owner", help="Team told about expiry and failures.")
            p.add_argument("--description", help="What uses this secret.")
            p.add_argument("--warn-before", help="Flag this long before expiry, e.g. 30d (empty: the type's default).")
            p.add_argument("--config", help="The whole configuration as a JSON object (`secret schema TYPE` lists keys).")
            p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                           help="One config key; VALUE is read as JSON if it is JSON (port=5432), else as text.")
        add.add_argument("--no-inspect", action="store_true", help="Do not read the value now (it may not exist yet).")

        show = sub.add_parser("show", help="A managed secret's fields, configuration and observed metadata.")
        show.add_argument("name")
        show.add_argument("--json", action="store_true")
        refresh = sub.add_parser("refresh", help="Read the current value and record its non-secret facts (TLS: expiry).")
        refresh.add_argument("name")
        sub.add_parser("list", help="Every managed secret: name, type, source:path, status.")
        sub.add_parser("check", help="List managed secrets whose stored configuration no longer validates (exit 1 if any).")
        schema = sub.add_parser("schema", help="The configuration keys of a type (or of every type) as a table.")
        schema.add_argument("secret_type", nargs="?", choices=types)

    def handle(self, *args, subcommand, **options):
        try:
            return getattr(self, "_" + subcommand)(options)
        except ValidationError as exc:
            raise CommandError(_validation_message(exc)) from None

    def _fields(self, options) -> dict:
        fields = {name: options[name] for name in ("owner", "description") if options.get(name) is not None}
        if options.get("warn_before") is not None:
            try:
                fields["warn_before"] = parse_period(options["warn_before"]) if options["warn_before"] else None
            except ValueError as exc:
                raise CommandError(f"--warn-before: {exc}") from None
        return fields

    def _add(self, options):
        secret = services.register_secret(
            name=options["name"], secret_type=options["secret_type"], source=options["source"], path=options["path"],
            config=_config(options, {}) or {}, actor=self.actor(options), inspect=not options["no_inspect"],
            **self._fields(options))
        self.stdout.write(f"registered {secret.name} ({secret.get_secret_type_display()}) at {secret.source}:{secret.path}")

    def _change(self, options):
        secret = secret_named(options["name"])
        changes = self._fields(options)
        changes.update({name: options[name] for name in ("source", "path") if options[name] is not None})
        config = _config(options, secret.config)
        if config is not None:
            changes["config"] = config
        if not changes:
            raise CommandError("nothing to change: give --source, --path, --config, --set, --unset, --owner, "
                               "--description or --warn-before")
        secret = services.update_secret(secret, actor=self.actor(options), **changes)
        self.stdout.write(f"changed {secret.name}: {', '.join(sorted(changes))}")

    def _show(self, options):
        secret = secret_named(options["name"])
        facts = {
            "name": secret.name, "type": secret.secret_type, "source": secret.source, "path": secret.path,
            "owner": secret.owner, "status": secret.status, "config": secret.config,
            "warn_before": format_period(secret.effective_warn_before),
            "expires_at": secret.expires_at.isoformat() if secret.expires_at else None,
            "last_rotated_at": secret.last_rotated_at.isoformat() if secret.last_rotated_at else None,
            "metadata": secret.metadata,
        }
        if options["json"]:
            self.stdout.write(json.dumps(facts, indent=2, default=str))
            return
        for name, value in facts.items():
            self.stdout.write(f"{name}: {json.dumps(value, default=str) if isinstance(value, dict) else value}")

    def _refresh(self, options):
        secret = services.refresh_secret(secret_named(options["name"]), actor=self.actor(options))
        expires = f", expires {secret.expires_at:%Y-%m-%d %H:%M} UTC" if secret.expires_at else ""
        self.stdout.write(f"{secret.name}: version {secret.metadata.get('version', '?')} read{expires}")

    def _list(self, options):
        for secret in ManagedSecret.objects.order_by("name"):
            self.stdout.write(f"{secret.name}\t{secret.secret_type}\t{secret.source}:{secret.path}\t{secret.status}")

    def _check(self, options):
        invalid = services.invalid_secret_configs()
        for secret, error in invalid:
            self.stdout.write(f"{secret.name} ({secret.secret_type}): {error}")
        if invalid:
            raise CommandError(f"{len(invalid)} managed secret(s) need their configuration fixed "
                               "(manage.py secret change NAME --set KEY=VALUE / --unset KEY)")
        self.stdout.write(f"all {ManagedSecret.objects.count()} managed secret configuration(s) are valid")

    def _schema(self, options):
        for secret_type in [options["secret_type"]] if options["secret_type"] else sorted(EXECUTORS):
            label = ManagedSecret.Type(secret_type).label
            self.stdout.write(f"{secret_type} ({label})\n{executor_for(secret_type).schema.markdown_table()}\n")
