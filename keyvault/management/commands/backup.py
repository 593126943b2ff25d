"""``manage.py backup verify`` — check a restored instance before anyone relies on it (docs/ops/backup.md)."""

from __future__ import annotations

import json
import sys
import time

from django.core.management.base import CommandError

from keyvault.ops import backup

from ._base import KeyvaultCommand
from .audit import positive_int

#: Seconds between two progress lines on stderr.
PROGRESS_SECONDS = 2.0


class Command(KeyvaultCommand):
    help = "Check a restored instance: every data key opens under its KEK, and the audit chain verifies."

    def add_arguments(self, parser):
        super().add_arguments(parser)
        sub = parser.add_subparsers(dest="subcommand", required=True)
        verify = sub.add_parser(
            "verify", help="Open every data key through its provider (no plaintext kept or shown), compare each KEK's "
                           "versions with its provider, verify the audit chain; exit 1 on any failure.")
        verify.add_argument("--json", action="store_true", help="Machine-readable report on stdout.")
        verify.add_argument("--kek", action="append", metavar="NAME", help="Only the data keys of this KEK (repeatable).")
        verify.add_argument("--batch-size", type=positive_int, default=backup.BATCH_SIZE,
                            help=f"Data keys read and opened per batch (default {backup.BATCH_SIZE}).")
        verify.add_argument("--jobs", type=positive_int, default=None,
                            help="PostgreSQL connections reading the audit chain (as audit verify --jobs).")
        witness = verify.add_mutually_exclusive_group()
        witness.add_argument("--witness", metavar="FILE|URL",
                             help="Verify the chain against this copy of the witness instead of HMD_AUDIT_WITNESS.")
        witness.add_argument("--no-witness", action="store_true",
                             help="Do not check any witness (the report says so). Not for a restore you rely on.")
        verify.add_argument("--quiet", action="store_true", help="No progress lines on stderr.")

    def handle(self, *args, subcommand, **options):
        return getattr(self, f"_{subcommand}")(options)

    def _verify(self, options):
        report = backup.verify_restore(
            actor=self.actor(options), kek_names=options["kek"] or (), batch_size=options["batch_size"],
            witness=options["witness"] or None, use_witness=not options["no_witness"], jobs=options["jobs"],
            progress=None if options["quiet"] else self._progress(),
        )
        if options["json"]:
            self.stdout.write(json.dumps(report.as_dict(), indent=2, sort_keys=True))
        else:
            for line in report.lines():
                self.stdout.write(line)
        if not report.ok:
            raise CommandError(f"restore NOT verified: {report.failed} data key(s) failed"
                               + ("" if report.audit is None or report.audit.ok else f"; audit {report.audit}"))

    def _progress(self):
        last = [0.0]

        def show(done: int, total: int) -> None:
            now = time.monotonic()
            if done == total or now - last[0] >= PROGRESS_SECONDS:
                last[0] = now
                sys.stderr.write(f"checked {done}/{total} data keys\n")
                sys.stderr.flush()

        return show
