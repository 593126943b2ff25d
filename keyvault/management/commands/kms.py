"""``manage.py kms <subcommand>`` — keys and cryptography from the command line.

Key subcommands go through ``keyvault.keys.services`` (``create-key`` through
``rotation.services``, which gives the key its rotation policy), so the inventory and the
audit log see everything the console would. Binary data travels as base64 on stdout.
"""

from __future__ import annotations

import base64
import binascii
import json
import sys
from datetime import timedelta

from django.core.management.base import CommandError

from keyvault.keys import impact, master_key, services
from keyvault.models import DataKey, KeyEncryptionKey
from keyvault.ops.bootstrap import DEMO_DATA_KEYS, MAX_DEMO_DATA_KEYS, seed_demo_data_keys
from rotation import services as rotation_services
from rotation.models import format_period

from ._base import KeyvaultCommand


def parse_context(pairs: list[str] | None) -> dict[str, str]:
    """``["k=v", ...]`` to a dict; the first ``=`` splits, so values may contain ``=``."""
    context: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CommandError(f"--context takes key=value, got {pair!r}")
        if key in context:
            raise CommandError(f"--context names {key!r} twice")
        context[key] = value
    return context


def read_base64_stdin() -> bytes:
    text = sys.stdin.read().strip()
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise CommandError("stdin is not base64 (expected the output of kms encrypt)") from None


def kek_named(name: str) -> KeyEncryptionKey:
    kek = KeyEncryptionKey.objects.filter(name=name).first()
    if kek is None:
        raise CommandError(f"no KEK named {name!r} (create it: python manage.py kms create-key {name})")
    return kek


def data_key_numbered(pk: int) -> DataKey:
    data_key = DataKey.objects.select_related("kek").filter(pk=pk).first()
    if data_key is None:
        raise CommandError(f"no data key #{pk}")
    return data_key


class Command(KeyvaultCommand):
    help = "Manage KEKs and encrypt/decrypt through the configured KMS providers."

    def add_arguments(self, parser):
        super().add_arguments(parser)
        sub = parser.add_subparsers(dest="subcommand", required=True)

        health = sub.add_parser("health", help="Check the default provider (or every configured one with --all).")
        health.add_argument("--all", action="store_true", help="Check every configured provider.")
        health.add_argument("--provider", help="Check this provider.")

        create = sub.add_parser("create-key", help="Create a KEK and register it.")
        create.add_argument("name")
        create.add_argument("--provider", help="Provider name (default: HMD_KMS_PROVIDER).")
        create.add_argument("--description", default="")
        create.add_argument("--rotation-period-days", type=int, default=365,
                            help="Days to the first rotation and between planned rotations (the key's rotation policy; "
                            "change it later with rotation policy --period).")
        create.add_argument("--max-encryptions-per-version", type=int)

        for name, text in (("describe-key", "Show a KEK, its versions and coverage."), ("rotate-key", "Make a new primary version.")):
            p = sub.add_parser(name, help=text)
            p.add_argument("name")
            p.add_argument("--json", action="store_true", help="Machine-readable output.")

        seed = sub.add_parser("seed-demo", help="Register demo data keys under a KEK, so a rotation has something to "
                              "rewrap (development; purpose 'demo').")
        seed.add_argument("name")
        seed.add_argument("--data-keys", type=int, default=DEMO_DATA_KEYS,
                          help=f"How many (default {DEMO_DATA_KEYS}, at most {MAX_DEMO_DATA_KEYS}).")

        for name, text in (("encrypt", "Encrypt stdin with a KEK; base64 ciphertext on stdout."),
                           ("envelope-encrypt", "Envelope-encrypt stdin under a KEK; base64 blob on stdout.")):
            p = sub.add_parser(name, help=text)
            p.add_argument("--key", required=True, help="KEK name.")
            p.add_argument("--context", action="append", metavar="KEY=VALUE", help="Encryption context pair (repeatable).")

        for name, text in (("decrypt", "Decrypt base64 stdin (from kms encrypt); plaintext on stdout."),
                           ("envelope-decrypt", "Decrypt a base64 envelope blob from stdin; plaintext on stdout.")):
            p = sub.add_parser(name, help=text)
            p.add_argument("--context", action="append", metavar="KEY=VALUE", help="Encryption context pair (repeatable).")
            p.add_argument("--provider", help="Provider that made the ciphertext (default: HMD_KMS_PROVIDER).")

        # Key and version states: the console's Disable/Enable, Schedule/Cancel deletion and Retire version.
        disable = sub.add_parser("disable-key", help="Disable a KEK: it refuses every crypto operation until enabled.")
        disable.add_argument("name")
        disable.add_argument("--reason", required=True, help="Incident or ticket; audited.")
        enable = sub.add_parser("enable-key", help="Enable a disabled KEK.")
        enable.add_argument("name")
        deletion = sub.add_parser("schedule-key-deletion",
                                  help="Show what deleting a KEK breaks and schedule its destruction after a waiting period; crypto stops at once.")
        deletion.add_argument("name")
        deletion.add_argument("--waiting-days", type=int, default=services.DEFAULT_DELETION_WAIT_DAYS,
                              help=f"{services.MIN_DELETION_WAIT_DAYS}-{services.MAX_DELETION_WAIT_DAYS} days "
                              f"(default {services.DEFAULT_DELETION_WAIT_DAYS}).")
        deletion.add_argument("--dry-run", action="store_true", help="Only show what deleting it breaks; schedule nothing.")
        deletion.add_argument("--json", action="store_true", help="Machine-readable output.")
        cancel = sub.add_parser("cancel-key-deletion", help="Cancel a scheduled deletion; the KEK stays disabled.")
        cancel.add_argument("name")
        version_state = sub.add_parser(
            "set-version-state", help="Enable, disable or destroy one version of a KEK (says whether the provider enforces it).")
        version_state.add_argument("name")
        version_state.add_argument("version", type=int)
        version_state.add_argument("state", choices=["enabled", "disabled", "destroyed"])
        version_state.add_argument("--reason", default="", help="Why; audited (required with --force).")
        version_state.add_argument("--force", action="store_true",
                                   help="Retire a version that still wraps data keys (they stop opening).")
        version_state.add_argument("--confirm", default="", metavar="NAME",
                                   help="The KEK's name again, required to destroy a version.")

        destroy = sub.add_parser(
            "destroy-data-key",
            help="Delete a superseded data key from the registry for good (after its owner re-encrypted under a newer one).")
        destroy.add_argument("data_key_id", type=int, metavar="ID")
        destroy.add_argument("--replaced-by", type=int, required=True, metavar="ID",
                             help="The newer data key of the same owner that now encrypts its data (it must open).")
        destroy.add_argument("--reason", required=True, help="Incident or ticket; audited.")

        gdk = sub.add_parser("generate-data-key", help="Create and register a data key; prints JSON.")
        gdk.add_argument("--key", required=True, help="KEK name.")
        gdk.add_argument("--context", action="append", metavar="KEY=VALUE")
        gdk.add_argument("--key-spec", default="AES_256", choices=["AES_256", "AES_128"])
        gdk.add_argument("--owner", default="", help="Owner reference recorded with the data key.")
        gdk.add_argument("--purpose", default="")
        gdk.add_argument("--show-plaintext", action="store_true", help="Also print the plaintext key (base64). Handle with care.")

        sub.add_parser("recount-data-keys",
                       help="Recount the data keys each KEK version wraps (the inventory report's counters), after "
                       "data keys were loaded or restored around the key services; prints how many were corrected.")
        rekey = sub.add_parser(
            "rekey-local",
            help="Re-encrypt the local provider's keyring under a new master key, atomically "
            "(docs/ops/keyvault-secrets.md).",
        )
        rekey.add_argument(
            "--new-master-key-file", metavar="PATH",
            help="File (mode 0600) holding the new key: 32 random bytes, base64. Default: generate one into "
            "HMD_DATA_DIR/local_kms_master_key.<UTC time>.",
        )

    def handle(self, *args, subcommand, **options):
        return getattr(self, "_" + subcommand.replace("-", "_"))(options)

    # -- subcommands ---------------------------------------------------------

    def _health(self, options):
        from keyvault.keys import health

        if options["all"]:
            results = health.check_all().providers
        else:
            results = (health.check_provider(options["provider"] or None),)
        for result in results:
            word = "healthy" if result.reachable else "UNHEALTHY"
            self.stdout.write(f"{result.name}: {word} ({result.latency_ms:.1f} ms) — {result.detail}")
            if result.capabilities:
                self.stdout.write(f"  capabilities: {', '.join(result.capabilities)}")
            for check in result.keks:
                mark = "ok" if check.ok else "FAILED"
                self.stdout.write(f"  KEK {check.kek} ({check.provider_key_id}): {mark} — {check.detail}")
            if result.unchecked_keks:
                self.stdout.write(f"  {result.unchecked_keks} more enabled KEK(s) not checked")
        unhealthy = [result.name for result in results if not result.healthy]
        if unhealthy:
            raise CommandError(f"unhealthy: {', '.join(unhealthy)}")

    def _recount_data_keys(self, options):
        corrected = services.recount_data_keys()
        self.stdout.write(f"data-key counters: {corrected} KEK version(s) corrected")

    def _create_key(self, options):
        if options["rotation_period_days"] < 1:
            raise CommandError("--rotation-period-days must be at least 1")
        kek = rotation_services.create_kek_with_policy(
            name=options["name"],
            actor=self.actor(options),
            provider_name=options["provider"],
            description=options["description"],
            period=timedelta(days=options["rotation_period_days"]),
            max_encryptions_per_version=options["max_encryptions_per_version"],
        )
        self.stdout.write(f"created KEK {kek.name} at provider {kek.provider} (version 1 primary)")

    def _describe(self, kek: KeyEncryptionKey) -> dict:
        coverage = services.version_coverage(kek)
        policy = rotation_services.policy_of(kek)
        return {
            "name": kek.name,
            "provider": kek.provider,
            "provider_key_id": kek.provider_key_id,
            "state": kek.state,
            "deletion_date": kek.deletion_date.isoformat() if kek.deletion_date else None,
            "rotation_period": format_period(policy.period),
            "next_rotation_at": policy.next_due_at.isoformat() if policy.next_due_at else None,
            "last_rotated_at": kek.last_rotated_at.isoformat() if kek.last_rotated_at else None,
            "versions": [
                {"version": v.number, "state": v.state, "primary": v.is_primary, "data_keys": coverage.get(v.number, 0)}
                for v in kek.versions.order_by("number")
            ],
        }

    def _describe_key(self, options):
        info = self._describe(kek_named(options["name"]))
        if options["json"]:
            self.stdout.write(json.dumps(info, indent=2))
            return
        self.stdout.write(f"{info['name']}: {info['state']} at {info['provider']} ({info['provider_key_id']})")
        if info["deletion_date"]:
            self.stdout.write(f"destroyed on {info['deletion_date']} unless cancelled "
                              f"(python manage.py kms cancel-key-deletion {info['name']}; the key then stays disabled)")
        self.stdout.write(f"rotation every {info['rotation_period']}, next {info['next_rotation_at']}")
        for v in info["versions"]:
            mark = " (primary)" if v["primary"] else ""
            self.stdout.write(f"  v{v['version']}: {v['state']}{mark}, {v['data_keys']} data key(s)")

    def _rotate_key(self, options):
        version = services.rotate_kek_version(kek_named(options["name"]), actor=self.actor(options))
        if options["json"]:
            self.stdout.write(json.dumps({"name": options["name"], "primary_version": version.number}))
        else:
            self.stdout.write(f"rotated {options['name']}: version {version.number} is now primary")

    def _disable_key(self, options):
        kek = services.disable_kek(kek_named(options["name"]), actor=self.actor(options), reason=options["reason"])
        self.stdout.write(f"disabled {kek.name}: it refuses every encrypt and decrypt until enabled")

    def _write_impact(self, found: impact.DeletionImpact) -> None:
        self.stdout.write(f"deleting {found.kek} breaks: {found.data_keys} data key(s), "
                          f"{found.field_values} encrypted field value(s), {len(found.runs)} active run(s)")
        for version in found.versions:
            mark = " (primary)" if version.primary else ""
            self.stdout.write(f"  v{version.number}{mark}: {version.data_keys} data key(s)")
        for item in found.fields:
            new = "; new values are sealed under it" if item.configured else ""
            self.stdout.write(f"  field {item.label}: {item.values} value(s){new}")
        self.stdout.write("  managed secrets: " + (", ".join(found.managed_secrets) or "none (their values stay in their "
                                                   "secret sources)"))
        for run in found.runs:
            self.stdout.write(f"  run #{run.run_id} {run.target} ({run.kind}, {run.state}): {run.role}")

    def _seed_demo(self, options):
        kek = kek_named(options["name"])
        rows = seed_demo_data_keys(kek, count=options["data_keys"], actor=self.actor(options))
        self.stdout.write(f"registered {len(rows)} demo data key(s) under {kek.name} "
                          f"(v{rows[-1].kek_version}; {kek.data_keys.count()} in all)")

    def _enable_key(self, options):
        kek = services.enable_kek(kek_named(options["name"]), actor=self.actor(options))
        self.stdout.write(f"enabled {kek.name}")

    def _schedule_key_deletion(self, options):
        kek = kek_named(options["name"])
        found = impact.deletion_impact(kek)
        if options["dry_run"]:
            if options["json"]:
                self.stdout.write(json.dumps({**found.as_dict(), "scheduled": False}, indent=2))
            else:
                self._write_impact(found)
                self.stdout.write("dry run: nothing scheduled")
            return
        kek = services.schedule_kek_deletion(kek, actor=self.actor(options), waiting_days=options["waiting_days"])
        if options["json"]:
            self.stdout.write(json.dumps({**found.as_dict(), "scheduled": True,
                                          "deletion_date": kek.deletion_date.isoformat()}, indent=2))
            return
        self._write_impact(found)
        self.stdout.write(f"{kek.name} is pending deletion on {kek.deletion_date:%Y-%m-%d %H:%M} UTC; it refuses all "
                          f"cryptography now (undo: python manage.py kms cancel-key-deletion {kek.name})")

    def _cancel_key_deletion(self, options):
        kek = services.cancel_kek_deletion(kek_named(options["name"]), actor=self.actor(options))
        self.stdout.write(f"cancelled the deletion of {kek.name}; it stays disabled until enabled, as with AWS KMS "
                          f"(python manage.py kms enable-key {kek.name})")

    def _set_version_state(self, options):
        kek = kek_named(options["name"])
        if options["state"] == "destroyed" and options["confirm"] != kek.name:
            raise CommandError(f"destroying a version is final: repeat the key's name with --confirm {kek.name}")
        version = services.set_version_state(kek, options["version"], options["state"], actor=self.actor(options),
                                             force=options["force"], reason=options["reason"])
        if version.enforced_by == "provider":
            self.stdout.write(f"v{version.number} of {kek.name} is now {version.state} at provider {kek.provider}")
            return
        self.stdout.write(f"v{version.number} of {kek.name} is now {version.state} in Keyvault only")
        if version.state != "enabled":
            gap = services.revocation_gap(kek) or f"provider {kek.provider} still accepts v{version.number}"
            self.stderr.write(f"warning: {gap}")

    def _destroy_data_key(self, options):
        old, new = data_key_numbered(options["data_key_id"]), data_key_numbered(options["replaced_by"])
        services.destroy_data_key(old, replaced_by=new, actor=self.actor(options), reason=options["reason"])
        self.stdout.write(f"destroyed data key #{old.pk} of {old.owner_ref}; data key #{new.pk} replaces it")

    def _encrypt(self, options):
        plaintext = sys.stdin.buffer.read()
        sealed = services.encrypt_with_kek(
            kek_named(options["key"]), plaintext, actor=self.actor(options), encryption_context=parse_context(options["context"])
        )
        self.stdout.write(base64.b64encode(sealed.ciphertext).decode("ascii"))

    def _decrypt(self, options):
        ciphertext = read_base64_stdin()
        plaintext = services.decrypt_with_kek_ciphertext(
            ciphertext, actor=self.actor(options), provider_name=options["provider"],
            encryption_context=parse_context(options["context"]),
        )
        self._write_binary(plaintext)

    def _generate_data_key(self, options):
        row, plain = services.create_data_key(
            kek_named(options["key"]),
            actor=self.actor(options),
            encryption_context=parse_context(options["context"]),
            key_spec=options["key_spec"],
            owner_ref=options["owner"],
            purpose=options["purpose"],
        )
        with plain:
            output = {
                "data_key_id": row.pk,
                "kek": row.kek.name,
                "kek_version": row.kek_version,
                "key_spec": row.key_spec,
                "encryption_context": row.encryption_context,
                "ciphertext": base64.b64encode(bytes(row.wrapped_key)).decode("ascii"),
            }
            if options["show_plaintext"]:
                output["plaintext"] = base64.b64encode(plain.plaintext).decode("ascii")
            self.stdout.write(json.dumps(output, indent=2))

    def _envelope_encrypt(self, options):
        from keyvault.keys import envelopes

        blob = envelopes.encrypt(
            kek_named(options["key"]), sys.stdin.buffer.read(), actor=self.actor(options),
            encryption_context=parse_context(options["context"]),
        )
        self.stdout.write(base64.b64encode(blob).decode("ascii"))

    def _envelope_decrypt(self, options):
        from keyvault.keys import envelopes

        plaintext = envelopes.decrypt(
            read_base64_stdin(), actor=self.actor(options), encryption_context=parse_context(options["context"])
        )
        self._write_binary(plaintext)

    def _rekey_local(self, options):
        outcome = master_key.rekey_local_keyring(actor=self.actor(options), new_key_file=options["new_master_key_file"])
        did = "was already sealed under" if outcome.already else "re-encrypted under"
        self.stdout.write(f"local keyring ({outcome.keys} key(s)) {did} the master key in {outcome.new_key_file} "
                          f"({outcome.fingerprint})")
        if outcome.development_key_file:
            self.stdout.write(f"development key file {outcome.development_key_file} now holds it; nothing to switch")
        else:
            self.stdout.write(f"next: give every process HMD_LOCAL_KMS_MASTER_KEY_FILE={outcome.new_key_file} "
                              "(or that value in your secret store) and restart it; until then processes on the "
                              "old key refuse the keyring")

    def _write_binary(self, data: bytes) -> None:
        self.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
