"""``manage.py api client create|rotate-token|revoke|list`` — application clients of ``/api/v1/`` (audited)."""

from __future__ import annotations

from datetime import timedelta

from django.utils.dateparse import parse_datetime

from keyvault.api import services

from ._base import KeyvaultCommand


class Command(KeyvaultCommand):
    help = "Manage the application clients of the API and their bearer tokens."

    def add_arguments(self, parser):
        super().add_arguments(parser)
        groups = parser.add_subparsers(dest="group", required=True)
        client = groups.add_parser("client", help="Application clients.")
        sub = client.add_subparsers(dest="subcommand", required=True)
        create = sub.add_parser("create", help="Create a client; prints its token once.")
        create.add_argument("name", metavar="NAME")
        create.add_argument("--kek", action="append", default=[], required=True,
                            help="A KEK the client may use (repeat for several).")
        create.add_argument("--ops", required=True,
                            help=f"Comma-separated operations: {','.join(services.OPERATIONS)}.")
        create.add_argument("--context-require", action="append", default=[], metavar="KEY[=VALUE]",
                            help="A required context key, optionally with an allowed value or glob (repeatable).")
        create.add_argument("--network", action="append", default=[], metavar="CIDR",
                            help="Allow calls only from this network (repeatable; default: any address).")
        create.add_argument("--owner", default="", help="Team or person answerable for the client.")
        create.add_argument("--expires", help="ISO date-time after which the client is refused.")
        create.add_argument("--rate-limit", type=int, help="Requests per second (0: no limit).")
        rotate = sub.add_parser("rotate-token", help="Issue a new token; the previous one works for the overlap.")
        rotate.add_argument("name", metavar="NAME")
        rotate.add_argument("--overlap-hours", type=float, default=services.DEFAULT_OVERLAP.total_seconds() / 3600,
                            help="How long the previous token keeps working (default 24).")
        revoke = sub.add_parser("revoke", help="Revoke a client: its tokens answer 401 within 2 s (the web processes' token cache).")
        revoke.add_argument("name", metavar="NAME")
        revoke.add_argument("--reason", default="")
        sub.add_parser("list", help="List clients, their KEKs, operations and live tokens.")

    def handle(self, *args, subcommand, **options):
        getattr(self, "_" + subcommand.replace("-", "_"))(options)

    def _create(self, options):
        expires = None
        if options["expires"]:
            expires = parse_datetime(options["expires"])
            if expires is None:
                raise ValueError(f"--expires {options['expires']!r} is not an ISO date-time")
        client, token = services.create_client(
            name=options["name"], actor=self.actor(options), keks=options["kek"], owner=options["owner"],
            operations=options["ops"].split(","),
            context_constraints=services.parse_context_requirements(options["context_require"]),
            allowed_networks=options["network"], expires_at=expires, rate_limit_per_second=options["rate_limit"],
        )
        self.stderr.write(f"Created API client {client.name}. Its token (shown once, store it now):")
        self.stdout.write(token)

    def _rotate_token(self, options):
        hours = options["overlap_hours"]
        if not 0 <= hours <= services.MAX_OVERLAP.total_seconds() / 3600:  # timedelta() overflows far beyond
            raise ValueError(f"--overlap-hours must be 0 to {services.MAX_OVERLAP.total_seconds() / 3600:g}")
        token = services.rotate_token(options["name"], actor=self.actor(options), overlap=timedelta(hours=hours))
        self.stderr.write(f"New token for {options['name']} (shown once); the previous one works for {hours:g} h more:")
        self.stdout.write(token)

    def _revoke(self, options):
        client = services.revoke_client(options["name"], actor=self.actor(options), reason=options["reason"])
        self.stdout.write(f"API client {client.name} is revoked; its tokens are refused.")

    def _list(self, options):
        for client in services.list_clients():
            state = "enabled" if client.enabled else "revoked"
            keks = ",".join(k.name for k in client.keks.all()) or "-"
            context = ";".join(f"{k}={'|'.join(v) or '*'}" for k, v in client.context_constraints.items()) or "-"
            self.stdout.write(
                f"{client.name}\t{state}\tkeks={keks}\tops={','.join(client.operations)}\tcontext={context}"
                f"\ttokens={services.active_token_count(client)}\towner={client.owner or '-'}"
            )
