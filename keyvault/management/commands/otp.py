"""``manage.py otp reset-throttle|reset-device USER`` — give a user their second factor back (audited)."""

from __future__ import annotations

from keyvault.access import accounts

from ._base import KeyvaultCommand


class Command(KeyvaultCommand):
    help = "Recover a user's two-factor login: clear a device's back-off, or delete their devices to re-enrol."

    def add_arguments(self, parser):
        super().add_arguments(parser)
        sub = parser.add_subparsers(dest="subcommand", required=True)
        throttle = sub.add_parser("reset-throttle",
                                  help="Clear the back-off after repeated wrong codes on USER's devices.")
        throttle.add_argument("username", metavar="USER")
        device = sub.add_parser("reset-device",
                                help="Delete USER's TOTP devices; they enrol a new one at their next login.")
        device.add_argument("username", metavar="USER")

    def handle(self, *args, subcommand, username, **options):
        user = accounts.user_named(username)
        actor = self.actor(options) if options.get("user") else accounts.command_actor()
        if subcommand == "reset-throttle":
            count = accounts.reset_throttle(user, actor=actor)
            self.stdout.write(f"Throttling reset on {count} device(s) of {username}.")
        else:
            count = accounts.reset_devices(user, actor=actor)
            self.stdout.write(f"Deleted {count} device(s) of {username}; they enrol again at their next login.")
