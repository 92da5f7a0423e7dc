"""The Celery app: configured from Django settings (CELERY_* names), tasks found in the apps."""

import gc
import os

from celery import Celery
from celery.signals import worker_init

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")

app = Celery("portal")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@worker_init.connect
def _keep_memory_shared_with_the_pool(**_):
    """Before the worker forks its pool processes: move everything loaded so far (Django, the
    app, the libraries) out of the garbage collector's reach. A collection writes into every
    object it visits, which copies each shared page into the child that ran it; frozen objects
    stay shared. The worker tree's memory (PSS) went from 133 to 106 MB idle (bench/README.md)."""
    gc.collect()
    gc.freeze()
