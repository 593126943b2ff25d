"""Django's ``createsuperuser``, audited: the new user is a ``user.created`` event by ``system:cli:<os user>``."""

from __future__ import annotations

from django.contrib.auth.management.commands import createsuperuser

from keyvault.access import accounts


class Command(createsuperuser.Command):
    def handle(self, *args, **options):
        with accounts.recording(accounts.command_actor()):
            return super().handle(*args, **options)
