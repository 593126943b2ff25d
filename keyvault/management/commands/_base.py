"""Shared behaviour of Keyvault's commands: one clear line on stderr for expected errors."""

from __future__ import annotations

import argparse
import sys

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from keyvault.audit import Actor
from keyvault.exceptions import KeyvaultError
from keyvault.kms.errors import KMSError

EXPECTED_ERRORS = (KMSError, KeyvaultError, ValueError)


class KeyvaultCommand(BaseCommand):
    """A command whose expected failures print ``error: …`` and exit 1, without a traceback."""

    def add_arguments(self, parser):
        parser.add_argument(
            "--user",
            help="Act as this console user (recorded in the audit log); default: the operating-system user.",
        )

    def actor(self, options) -> Actor:
        return self.actor_named(options.get("user"))

    def actor_named(self, username: str | None) -> Actor:
        """The console user ``username``, or the operating-system user when none is named."""
        if username:
            user = get_user_model().objects.filter(username=username).first()
            if user is None:
                raise CommandError(f"no such user: {username}")
            return Actor.user(user)
        import getpass

        return Actor.system(f"cli:{getpass.getuser()}")

    _from_command_line = False

    def create_parser(self, prog_name, subcommand, **kwargs):
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        # ``--user`` may also follow the subcommand (``rotation approve 3 --user bella``).
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice in action.choices.values():
                    choice.add_argument("--user", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        return parser

    def run_from_argv(self, argv):
        self._from_command_line = True
        super().run_from_argv(argv)

    def execute(self, *args, **options):
        try:
            return super().execute(*args, **options)
        except (*EXPECTED_ERRORS, CommandError) as exc:
            if self._from_command_line and not options.get("traceback"):
                # One line on stderr, no traceback, non-zero exit: scripts test $?.
                self.stderr.write(f"error: {_one_line(exc)}")
                sys.exit(getattr(exc, "returncode", 1))
            if isinstance(exc, CommandError):
                raise
            raise CommandError(_one_line(exc)) from exc


def _one_line(exc: Exception) -> str:
    if isinstance(exc, CommandError):
        return str(exc)
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
