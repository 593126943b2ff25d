"""``manage.py report <name>`` — the auditor reports, exported and recorded in the audit log.

Every run is an export: the output carries the audit chain position it was
produced at, ends with a seal naming its SHA-256 and the ``audit.exported`` event
that records it, and can be checked later with ``manage.py audit verify-export FILE``.
"""

from __future__ import annotations

import sys
from pathlib import Path


from keyvault.console import reports
from keyvault.audit import Actor

from ._base import KeyvaultCommand


class Command(KeyvaultCommand):
    help = "Produce an auditor report (inventory, rotations, activity, violations) as CSV, JSON or HTML."

    def add_arguments(self, parser):
        # Not super(): here --user is the report's subject; the acting user is --as-user.
        parser.add_argument("name", choices=sorted(reports.REPORTS), help="Which report.")
        parser.add_argument("--format", choices=reports.FORMATS, default="csv")
        parser.add_argument("--since", help="From this date/time (UTC), e.g. 2026-01-01.")
        parser.add_argument("--until", help="Before this date/time (UTC, exclusive).")
        parser.add_argument("--user", help="Only this user's actions (rotations, activity).")
        parser.add_argument("--kek", help="Only this key-encryption key.")
        parser.add_argument("--output", "-o", help="Write to this file instead of stdout.")
        parser.add_argument("--as-user", dest="as_user",
                            help="Record the export as this console user (default: the operating-system user).")

    def actor(self, options) -> Actor:
        # ``--user`` filters the report here; the acting user is ``--as-user``.
        return self.actor_named(options.get("as_user"))

    def handle(self, *args, name, **options):
        spec = reports.get_spec(name)
        filters = {key: options.get(key) for key in ("since", "until", "user", "kek")}
        if options["format"] == "csv" and spec.keyset is not None:
            # A report that can be large is streamed (every row, no cap), as the console's CSV is.
            result = reports.stream_csv(spec.name, filters, actor=self.actor(options))
            chunks, report = result, result.report
        else:
            report = reports.build(spec.name, filters)
            result = reports.export(report, fmt=options["format"], actor=self.actor(options))
            chunks = [result.content]
        self.write_chunks(chunks, options.get("output"))
        self.stderr.write(
            f"{result.rows} rows; body sha256 {result.body_sha256}; recorded as audit event #{result.event_sequence} "
            f"(chain position #{report.chain_sequence} at production)"
        )

    def write_chunks(self, chunks, output: str | None) -> None:
        if output:
            with Path(output).open("wb") as target:
                for chunk in chunks:
                    target.write(chunk)
            return
        out = getattr(self.stdout, "_out", sys.stdout)
        buffer = getattr(out, "buffer", None)
        if buffer is not None:
            out.flush()
        for chunk in chunks:
            if buffer is not None:
                buffer.write(chunk)
            else:
                out.write(chunk.decode("utf-8"))
        if buffer is not None:
            buffer.flush()
