"""Django's ``changepassword``, audited: a ``user.password_changed`` event by ``system:cli:<os user>``."""

from __future__ import annotations

from django.contrib.auth.management.commands import changepassword

from keyvault.access import accounts


class Command(changepassword.Command):
    def handle(self, *args, **options):
        with accounts.recording(accounts.command_actor()):
            return super().handle(*args, **options)
