"""The Celery application: workers and beat load their settings from Django's."""

import gc
import os

from celery import Celery
from celery.signals import worker_process_init

from keyvault.config import PRIVATE_UMASK

os.umask(PRIVATE_UMASK)  # the beat schedule, broker messages, SQLite files: owner-only
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "keyvault.settings")

app = Celery("keyvault")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@worker_process_init.connect
def _freeze_startup_objects(**_) -> None:
    """Keep what every worker process holds from startup (Django, the apps, ~110,000 objects) out of the collector.

    Each full collection walks every tracked object, and a rotation batch allocates enough
    (thousands of rows and results) to trigger several: building a batch's items cost 0.96
    against 0.36 µs each with these frozen. Objects made later are collected as usual.
    """
    gc.freeze()
