"""``manage.py preferences`` — show or set a console user's preferences (``keyvault.console.timezones``)."""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.core.management.base import CommandError

from keyvault.console import timezones

from ._base import KeyvaultCommand


class Command(KeyvaultCommand):
    help = "Show a console user's time zone, or set it with --time-zone (an IANA name such as Europe/Berlin, or UTC)."

    def add_arguments(self, parser):
        parser.add_argument("--user", required=True, help="The console user whose preferences these are.")
        parser.add_argument("--time-zone", dest="time_zone", help="Show this user times in this zone.")

    def handle(self, *args, user, time_zone=None, **options):
        account = get_user_model().objects.filter(username=user).first()
        if account is None:
            raise CommandError(f"no such user: {user}")
        if time_zone:
            # The actor is whoever runs the command (the OS user); --user names whose preference changes.
            timezones.set_time_zone(account, time_zone=time_zone, actor=self.actor_named(None))
        self.stdout.write(f"time zone: {timezones.time_zone_of(account)}")
