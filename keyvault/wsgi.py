import os

from django.core.wsgi import get_wsgi_application

from keyvault.config import PRIVATE_UMASK

os.umask(PRIVATE_UMASK)  # files this process creates are its owner's only (settings does it too)
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "keyvault.settings")
_console = get_wsgi_application()  # sets Django up

from keyvault.api.handler import dispatch  # noqa: E402 - needs the settings configured

application = dispatch(_console)
