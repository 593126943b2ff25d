#!/usr/bin/env python
"""Keyvault's command line: ``python manage.py <command>`` (see ``python manage.py help``)."""

import os
import sys

from keyvault.config import PRIVATE_UMASK


def main() -> None:
    os.umask(PRIVATE_UMASK)  # before anything writes: SQLite's -wal/-shm files, the broker, secrets
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "keyvault.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
