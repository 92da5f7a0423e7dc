"""The reviewers' dashboard: the figures, each from the rows (Upload, UploadEvent) in one query,
and the workers as Celery sees them through the broker.

- uploads per state now;
- failures and refusals by reason over the last days (the timeline's moves to FAILED and REFUSED,
  each with the code it stopped with: UploadEvent.error_code);
- bytes sent to IMS per day (files IMS received in full: the moves from PUSHING to PROCESSING, by
  the day the last byte went);
- pushes running now, with their speed (the row's progress and heartbeat fields);
- workers online and queue lengths (`workers_report`: Celery's ping and a queue declaration over
  the broker, with a short timeout; the page asks for them separately, so that it never waits on
  the broker itself).
"""

import logging
import re
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta

from django.conf import settings
from django.db.models import Count, Sum, Value
from django.db.models.functions import Coalesce, NullIf, TruncDate
from django.utils import timezone
from kombu.exceptions import OperationalError

from uploads.all_uploads import reason_label
from uploads.models import Status, Upload, UploadEvent

log = logging.getLogger(__name__)

STOPS_DAYS = 7
BYTES_DAYS = 30
# A page shows at most this many running pushes (a handful run at once: one per worker process).
RUNNING_SHOWN = 20
# How long the dashboard waits for workers to answer a ping, and for the broker to take a connection.
WORKER_PING_SECONDS = 1
# The queues the workers take messages from (settings.CELERY_TASK_ROUTES and Celery's default).
QUEUES = ("uploads", "celery")
# user:password@ in a URL an error message may quote.
_WITHOUT_PASSWORDS = re.compile(r"(\w+://)[^/@\s]*@")


def uploads_per_state() -> list[dict]:
    """Every state, in the state machine's order, with how many uploads are in it now (0 too)."""
    counts = dict(Upload.objects.order_by().values_list("status").annotate(n=Count("id")))
    return [{"status": status, "label": label, "count": counts.get(status, 0)} for status, label in Status.choices]


def _day_start(day: date) -> datetime:
    return timezone.make_aware(datetime.combine(day, time.min))


def stops_by_reason(days: int = STOPS_DAYS) -> list[dict]:
    """Failures and refusals since `days` days ago, by reason, the most frequent first:
    {"code", "label", "failed", "refused", "total"}. Timeline lines from before the event had a
    code of its own take the upload's code."""
    since = timezone.now() - timedelta(days=days)
    rows = (
        UploadEvent.objects.filter(at__gte=since, to_status__in=[Status.FAILED, Status.REFUSED])
        .order_by()
        .values("to_status", reason=Coalesce(NullIf("error_code", Value("")), "upload__error_code"))
        .annotate(n=Count("id"))
    )
    by_code: dict[str, dict] = {}
    for row in rows:
        code = row["reason"] or ""
        entry = by_code.setdefault(code, {"code": code, "label": reason_label(code) if code else "—",
                                          "failed": 0, "refused": 0, "total": 0})
        entry["failed" if row["to_status"] == Status.FAILED else "refused"] += row["n"]
        entry["total"] += row["n"]
    return sorted(by_code.values(), key=lambda entry: (-entry["total"], str(entry["label"])))


def bytes_sent_per_day(days: int = BYTES_DAYS) -> list[tuple[date, int]]:
    """(day, bytes) for each of the last `days` days, today last, days without a push as 0."""
    today = timezone.localdate()
    first = today - timedelta(days=days - 1)
    sums = dict(
        UploadEvent.objects.filter(at__gte=_day_start(first), from_status=Status.PUSHING, to_status=Status.PROCESSING)
        .order_by()
        .annotate(day=TruncDate("at"))
        .values_list("day")
        .annotate(sent=Sum(Coalesce("upload__send_size", "upload__size")))
    )
    return [(first + timedelta(days=n), int(sums.get(first + timedelta(days=n)) or 0)) for n in range(days)]


@dataclass
class RunningPush:
    upload: Upload
    percent: int
    rate: float  # bytes per second, as the push last wrote it
    heartbeat_age: float | None  # seconds since the worker's last heartbeat
    stale: bool  # no heartbeat for PUSH_STALE_SECONDS: its worker may have died


# Sending to IMS now: the usual push, and the early push while the browser still uploads.
SENDING = (Status.PUSHING, Status.SENDING_EARLY)


def running_pushes(limit: int = RUNNING_SHOWN) -> list[RunningPush]:
    """The pushes sending now, the longest running first, at most `limit` (uploads_per_state
    says how many there are)."""
    now = timezone.now()
    rows = Upload.objects.filter(status__in=SENDING).select_related("owner").order_by("push_started_at", "pk")
    pushes = []
    for upload in rows[:limit]:
        age = (now - upload.heartbeat_at).total_seconds() if upload.heartbeat_at else None
        whole = upload.send_size or upload.size
        pushes.append(RunningPush(
            upload=upload, percent=min(100, int(upload.sent_bytes * 100 / whole)) if whole else 0,
            rate=upload.send_rate, heartbeat_age=age,
            stale=age is None or age > settings.PUSH_STALE_SECONDS,
        ))
    return pushes


# ---------------------------------------------------------------------------------------------
# Workers, through the broker


@dataclass
class WorkersReport:
    broker_ok: bool
    workers: list[str] = field(default_factory=list)  # the names of the workers that answered
    queues: dict[str, int] = field(default_factory=dict)  # queue -> messages waiting
    problem: str = ""  # why the broker could not be asked (for admins; no secrets)


def workers_report(timeout: float = WORKER_PING_SECONDS) -> WorkersReport:
    """Which workers answer a ping within `timeout` seconds, and how many messages wait in each
    queue. The broker down or unreachable is a report (broker_ok False), never an exception."""
    from portal.celery import app

    options = {"socket_connect_timeout": timeout, "socket_timeout": timeout}  # added to the settings' options
    try:
        with app.connection_for_read(connect_timeout=timeout, transport_options=options) as connection:
            connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=timeout)
            queues = {name: _queue_length(connection, name) for name in QUEUES}
            answers = app.control.inspect(timeout=timeout, connection=connection).ping() or {}
    except (OperationalError, OSError, *_connection_errors(app)) as exc:
        problem = _WITHOUT_PASSWORDS.sub(r"\1***@", f"{type(exc).__name__}: {exc}")[:300]
        log.warning("dashboard: the broker did not answer: %s", problem)
        return WorkersReport(broker_ok=False, problem=problem)
    return WorkersReport(broker_ok=True, workers=sorted(answers), queues=queues)


def _queue_length(connection, name: str) -> int:
    """Messages waiting in a queue. A declaration answers with the count; on Redis it creates
    nothing (no key, no binding). Not a passive one: kombu's check that the queue exists misses
    queues under a global_keyprefix (tests/conftest.py's) and would say 0."""
    return connection.default_channel.queue_declare(queue=name).message_count


def _connection_errors(app) -> tuple:
    with app.connection_for_read() as connection:  # no connecting: only the transport's error types
        return tuple(connection.connection_errors)
