"""Where Django's admin autodiscovery finds the keyvault app's console (``keyvault.admin``).

The console lives in :mod:`keyvault.console`; importing its admin module registers
every model page (KEKs, versions, data keys, audit, SIEM consumers, users and
groups, managed secrets).
"""

from keyvault.console import admin  # noqa: F401 - registers the console's model admins
