"""``manage.py runbooks list|show|render|write|check`` — the runbook files, for people and for the docs.

``docs/ops/key-rotation.md`` holds the rendered runbooks between
``<!-- runbooks:start -->`` and ``<!-- runbooks:end -->``; ``write`` refreshes that
part and ``check`` fails when it differs from the files (CI runs the same check).
"""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import CommandError

from keyvault.management.commands._base import KeyvaultCommand
from rotation import runbooks

START, END = "<!-- runbooks:start -->", "<!-- runbooks:end -->"


def rendered() -> str:
    """Every runbook as Markdown, in file-name order, each under a level-3 heading."""
    parts = [
        "<!-- Generated from rotation/runbooks/*.md by `python manage.py runbooks write`; edit those files, not this section. -->"
    ]
    for slug, runbook in runbooks.all_runbooks().items():
        parts.append(f'<a id="runbook-{slug}"></a>\n\n' + runbook.markdown(heading_level=4))
    return "\n\n".join(parts).strip() + "\n"


def splice(document: str, section: str) -> str:
    if START not in document or END not in document:
        raise CommandError(f"the document has no {START} … {END} markers")
    head, rest = document.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{section}{END}{tail}"


class Command(KeyvaultCommand):
    help = "List, show and render the runbooks; keep docs/ops/key-rotation.md in step with them."

    def add_arguments(self, parser):
        super().add_arguments(parser)
        sub = parser.add_subparsers(dest="subcommand", required=True)
        sub.add_parser("list", help="Every runbook with the runs it applies to.")
        show = sub.add_parser("show", help="One runbook as Markdown.")
        show.add_argument("slug")
        sub.add_parser("render", help="All runbooks as Markdown on stdout.")
        for name in ("write", "check"):
            p = sub.add_parser(name, help=f"{name.title()} the runbook section of a document.")
            p.add_argument("path", nargs="?", default="docs/ops/key-rotation.md")

    def handle(self, *args, subcommand, **options):
        if subcommand == "list":
            for slug, runbook in runbooks.all_runbooks().items():
                self.stdout.write(f"{slug}\t{runbook.title}\t{', '.join(runbook.applies_to) or '-'}")
        elif subcommand == "show":
            runbook = runbooks.get(options["slug"])
            if runbook is None:
                raise CommandError(f"no runbook {options['slug']!r} (see: python manage.py runbooks list)")
            self.stdout.write(runbook.markdown())
        elif subcommand == "render":
            self.stdout.write(rendered())
        else:
            path = Path(options["path"])
            current = path.read_text()
            wanted = splice(current, rendered())
            if subcommand == "write":
                path.write_text(wanted)
                self.stdout.write(f"wrote the runbooks into {path}")
            elif current != wanted:
                raise CommandError(f"{path} is out of date with rotation/runbooks/; run: python manage.py runbooks write {path}")
            else:
                self.stdout.write(f"{path} matches rotation/runbooks/")
