"""``manage.py export_selection MODEL PK…`` — the console's "Export selected" bulk action on the command line.

Same service (``keyvault.console.selection``), same sealed file and ``audit.exported`` event;
check the file later with ``manage.py audit verify-export FILE``.
"""

from __future__ import annotations

from pathlib import Path

from keyvault.console import selection

from ._base import KeyvaultCommand

class Command(KeyvaultCommand):
    help = "Export chosen KEKs, data keys, audit events or rotation runs (by primary key) as a sealed, audited file."

    def add_arguments(self, parser):
        super().add_arguments(parser)
        parser.add_argument("model", choices=sorted(selection.SELECTIONS), help="What the keys name.")
        parser.add_argument("pks", nargs="+", type=int, metavar="PK", help="Primary keys of the rows to export.")
        parser.add_argument("--format", choices=("csv", "json"), default="csv")
        parser.add_argument("--output", "-o", help="Write to this file instead of stdout.")

    def handle(self, *args, model, pks, **options):
        result = selection.export_selection(model, pks, actor=self.actor(options), fmt=options["format"])
        if options.get("output"):
            Path(options["output"]).write_bytes(result.content)
        else:
            self.stdout.write(result.content.decode("utf-8"), ending="")
        self.stderr.write(f"{result.rows} rows; recorded as audit event #{result.event_sequence}")
