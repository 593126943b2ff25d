"""``manage.py search TERM`` — the console's global search (``keyvault.console.search``) on the command line."""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.core.management.base import CommandError

from keyvault.console import search

from ._base import KeyvaultCommand


class Command(KeyvaultCommand):
    help = ("Find KEKs, data keys (id or fingerprint), rotation runs, managed secrets and audit events "
            "(request id) by one term; one tab-separated line per hit.")

    def add_arguments(self, parser):
        parser.add_argument("term", help="A name, a number (data key or run id), a fingerprint or a request id.")
        parser.add_argument("--user", help="Show only what this console user may see (default: everything).")

    def handle(self, *args, term, **options):
        user = None
        if options.get("user"):
            user = get_user_model().objects.filter(username=options["user"]).first()
            if user is None:
                raise CommandError(f"no such user: {options['user']}")
        results = search.search(term, user=user)
        for hit in results.rows():
            self.stdout.write(f"{hit.kind}\t{hit.label}\t{hit.detail}\t{hit.url}")
        for note in results.notes:
            self.stderr.write(f"note: {note}")
        self.stderr.write(f"{results.total} match{'es' if results.total != 1 else ''} for {results.term!r}")
