"""The Celery application: workers and beat load their settings from Django's."""

import os

from celery import Celery

from keyvault.config import PRIVATE_UMASK

os.umask(PRIVATE_UMASK)  # the beat schedule, broker messages, SQLite files: owner-only
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "keyvault.settings")

app = Celery("keyvault")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
