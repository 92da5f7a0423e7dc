"""The Celery app: configured from Django settings (CELERY_* names), tasks found in the apps."""

import gc
import os

from celery import Celery
from celery.signals import worker_init
from kombu.transport import redis as kombu_redis

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


class RedisChannel(kombu_redis.Channel):
    """kombu's Redis channel, whose close() also finishes when the broker has gone.

    kombu's close() first reads the reply of a BRPOP still waiting on the socket. With Redis gone
    that read raises a connection error before anything is closed: the channel stays open with its
    unacknowledged messages (a push runs with its message unacknowledged: acks late). Celery drops
    the broken connection with collect(), which also clears the transport's connection details,
    and Celery 5.7 then closes that connection once more: the channel, still open, tries to give
    its messages back through a transport with no details left, and the AttributeError ("'NoneType'
    object has no attribute 'hostname'") ends the whole worker ("Unrecoverable error"). It happens
    whenever the worker waits for more messages while one is unacknowledged (concurrency above 1,
    or a retry waiting for its countdown). The failed read has cleared the pending BRPOP, so a
    second close() goes on to close the channel for good (tests/test_faults.py)."""

    def close(self):
        try:
            super().close()
        except self.connection_errors:
            if self.closed:  # the read went well; giving the messages back failed: nothing left to do
                raise
            super().close()


class RedisTransport(kombu_redis.Transport):
    """kombu's Redis transport with RedisChannel; settings.CELERY_BROKER_TRANSPORT names it."""

    Channel = RedisChannel
