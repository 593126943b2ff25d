"""``manage.py check --deploy`` warnings about where Keyvault keeps its state.

* ``keyvault.W001``: the database is SQLite, one local file with the sessions, TOTP
  secrets and audit log (production mode refuses it without
  ``HMD_ALLOW_SQLITE_IN_PRODUCTION=true``).
* ``keyvault.W002``: ``HMD_DATA_DIR``, or something in it, can be read or entered by
  group or other users.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from django.conf import settings
from django.core.checks import Tags, Warning, register

#: Walking a data folder with a full broker queue could take long: report from the first this many entries.
MAX_ENTRIES_CHECKED = 10_000
#: Paths named in the warning; the hint says how to fix them all.
MAX_PATHS_SHOWN = 5


@register(Tags.security, deploy=True)
def check_sqlite(app_configs=None, **kwargs) -> list[Warning]:
    sqlite = [alias for alias, db in settings.DATABASES.items() if db["ENGINE"] == "django.db.backends.sqlite3"]
    if not sqlite:
        return []
    return [Warning(
        "The database is SQLite: sessions, TOTP secrets and the audit log are one file on this host.",
        hint="Set HMD_DATABASE_URL to PostgreSQL for production (HMD_ALLOW_SQLITE_IN_PRODUCTION=true only "
             "accepts the risk; keep HMD_DATA_DIR 0700 then).",
        id="keyvault.W001",
    )]


@register(Tags.security, deploy=True)
def check_data_dir_modes(app_configs=None, **kwargs) -> list[Warning]:
    loose = loose_paths(Path(settings.DATA_DIR))
    if not loose:
        return []
    shown = ", ".join(f"{path} ({mode:04o})" for path, mode in loose[:MAX_PATHS_SHOWN])
    more = f" and {len(loose) - MAX_PATHS_SHOWN} more" if len(loose) > MAX_PATHS_SHOWN else ""
    return [Warning(
        f"HMD_DATA_DIR holds state other users can reach: {shown}{more}.",
        hint=f"chmod -R go-rwx {settings.DATA_DIR} (Keyvault creates it 0700, its files 0600).",
        id="keyvault.W002",
    )]


def loose_paths(data_dir: Path) -> list[tuple[str, int]]:
    """``(path, mode)`` of the folder and everything in it that group or other users may access."""
    loose = []
    for checked, path in enumerate(_walk(data_dir)):
        if checked >= MAX_ENTRIES_CHECKED:
            break
        try:
            mode = stat.S_IMODE(os.lstat(path).st_mode)
        except OSError:
            continue
        if mode & 0o077 and not os.path.islink(path):
            loose.append((str(path), mode))
    return loose


def _walk(data_dir: Path):
    if not data_dir.exists():
        return
    yield data_dir
    for folder, dirs, files in os.walk(data_dir):
        for name in (*dirs, *files):
            yield os.path.join(folder, name)
