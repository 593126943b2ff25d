import os

from django.core.wsgi import get_wsgi_application

from keyvault.config import PRIVATE_UMASK

os.umask(PRIVATE_UMASK)  # files this process creates are its owner's only (settings does it too)
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "keyvault.settings")
application = get_wsgi_application()
