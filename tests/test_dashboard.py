"""The reviewers' dashboard: uploads per state, failures and refusals by reason over 7 days, bytes
sent to IMS per day as an SVG chart with its table, pushes running with their speed, and the
workers and queues as the broker tells them (a real worker, real Redis; Redis away is a message)."""

import re
import time
import uuid
from datetime import timedelta

import pytest
from django.utils import timezone
from kombu import Exchange, Queue

from tests.test_review import make_reviewer
from uploads import dashboard
from uploads.errors import PortalError
from uploads.models import Status, Upload, UploadEvent
from uploads.services import state


@pytest.fixture
def carol(django_user_model):
    return make_reviewer(django_user_model, "carol")


@pytest.fixture
def carol_client(client, carol):
    client.force_login(carol)
    return client


def make_upload(owner, name="image", **fields) -> Upload:
    values = {"filename": f"{name}.raw", "disk_format": "raw", "size": 1000, "status": Status.RECEIVED,
              "staged_name": f"staged-{name}-{uuid.uuid4().hex[:6]}", **fields}
    return Upload.objects.create(owner=owner, name=name, **values)


def days_ago(event: UploadEvent, days: float) -> None:
    UploadEvent.objects.filter(pk=event.pk).update(at=timezone.now() - timedelta(days=days))


# ---------------------------------------------------------------------------------------------
# The figures


def test_the_dashboard_counts_uploads_in_every_state_now(alice, carol_client):
    for status, how_many in ((Status.READY, 3), (Status.FAILED, 2), (Status.AWAITING_REVIEW, 1)):
        for number in range(how_many):
            make_upload(alice, f"{status}-{number}", status=status)
    page = carol_client.get("/review/dashboard/").content.decode()
    counts = dict(re.findall(r'data-state-count="(\w+)">(\d+)<', page))
    assert counts == {**{status: "0" for status in Status.values}, "ready": "3", "failed": "2", "awaiting_review": "1"}
    assert 'href="/review/all/?state=failed"' in page  # each state leads to its uploads


def test_a_move_that_stops_an_upload_keeps_its_reason_code_on_the_timeline(alice):
    upload = make_upload(alice)
    state.end_with(upload, PortalError("Not allowed.", code="forbidden"))
    assert upload.events.get(to_status=Status.FAILED).error_code == "forbidden"
    state.move(upload, Status.RECEIVED, "Retry")
    assert upload.events.get(to_status=Status.RECEIVED).error_code == ""


def test_failures_and_refusals_are_counted_by_reason_over_the_last_seven_days(alice, carol_client):
    for number in range(3):
        state.end_with(make_upload(alice, f"denied-{number}"), PortalError("Not allowed.", code="forbidden"))
    refused = make_upload(alice, "broken", status=Status.CHECKING)
    state.move(refused, Status.REFUSED, "Damaged", error_code="corrupt")
    old = make_upload(alice, "long-ago")
    state.end_with(old, PortalError("Not allowed.", code="forbidden"))
    days_ago(old.events.get(to_status=Status.FAILED), 8)
    # Failed, retried, and now failing for another reason: both failures count, each with its own.
    twice = make_upload(alice, "twice")
    state.end_with(twice, PortalError("Cloud down.", code="server"))
    state.move(twice, Status.RECEIVED, "Retry", **state.NO_ERROR)
    state.end_with(twice, PortalError("Damaged.", code="corrupt"))
    assert [(s["code"], s["failed"], s["refused"]) for s in dashboard.stops_by_reason()] == [
        ("forbidden", 3, 0), ("corrupt", 1, 1), ("server", 1, 0),
    ]
    page = carol_client.get("/review/dashboard/").content.decode()
    assert "Failures and refusals, last 7 days" in page and "Not allowed in the cloud project" in page
    assert 'href="/review/all/?reason=corrupt"' in page


def test_a_stop_recorded_before_events_had_a_code_takes_the_uploads(alice):
    upload = make_upload(alice, status=Status.FAILED, error_code="network")
    UploadEvent.objects.create(upload=upload, from_status=Status.PUSHING, to_status=Status.FAILED, message="old")
    assert [(s["code"], s["label"]) for s in dashboard.stops_by_reason()] == [("network", "Cloud not reachable")]


def sent(upload: Upload, days: float) -> None:
    event = UploadEvent.objects.create(upload=upload, from_status=Status.PUSHING, to_status=Status.PROCESSING,
                                       message="sent")
    days_ago(event, days)


def test_bytes_sent_to_ims_per_day_for_thirty_days(alice):
    gib = 1024**3
    sent(make_upload(alice, "today", size=2 * gib), 0)
    sent(make_upload(alice, "converted", size=5 * gib, send_size=gib), 0)  # what was sent: the conversion
    sent(make_upload(alice, "last-week", size=3 * gib), 7)
    sent(make_upload(alice, "too-old", size=9 * gib), 31)
    other = make_upload(alice, "reconnected", size=4 * gib)  # IMS had it already: not sent again
    UploadEvent.objects.create(upload=other, from_status=Status.RECONNECT, to_status=Status.PROCESSING, message="x")
    per_day = dashboard.bytes_sent_per_day()
    today = timezone.localdate()
    assert len(per_day) == 30 and per_day[-1] == (today, 3 * gib) and per_day[0][0] == today - timedelta(days=29)
    assert dict(per_day)[today - timedelta(days=7)] == 3 * gib and sum(value for _, value in per_day) == 6 * gib


def test_the_chart_is_server_made_svg_an_image_with_title_description_and_a_table(alice, carol_client):
    sent(make_upload(alice, "today", size=3 * 1024**3), 0)
    sent(make_upload(alice, "earlier", size=1024**3), 2)
    page = carol_client.get("/review/dashboard/").content.decode()
    start = page.index('<svg class="bar-chart"')
    svg = page[start:page.index("</svg>", start)]
    assert 'role="img"' in svg and 'aria-labelledby="sent-chart-title sent-chart-desc"' in svg
    assert '<title id="sent-chart-title">Bytes sent to IMS per day</title>' in svg
    assert "4.0 GB in all" in svg.split("<desc")[1]
    assert svg.count("<rect ") == 30 and "3.0 GB</title></rect>" in svg
    heights = [float(h) for h in re.findall(r'<rect [^>]*height="([\d.]+)"', svg)]
    assert heights[-1] == max(heights) and heights[-3] == pytest.approx(heights[-1] / 3, abs=0.2)
    assert "<script" not in svg and "http" not in svg.replace("http://www.w3.org", "")  # nothing fetched
    table = page[page.index("The figures as a table"):]
    assert f'data-day="{timezone.localdate():%Y-%m-%d}" data-bytes="{3 * 1024**3}">3.0 GB' in table


def test_pushes_running_now_show_their_speed_and_a_worker_that_stopped_beating(settings, alice, carol_client):
    now = timezone.now()
    make_upload(alice, "fast", status=Status.PUSHING, size=1000 * 1024**2, sent_bytes=400 * 1024**2,
                send_rate=52 * 1024**2, heartbeat_at=now, push_started_at=now)
    make_upload(alice, "stuck", status=Status.PUSHING, size=1000, sent_bytes=10, send_rate=0,
                heartbeat_at=now - timedelta(seconds=settings.PUSH_STALE_SECONDS + 60), push_started_at=now)
    make_upload(alice, "waiting", status=Status.RECEIVED)
    page = carol_client.get("/review/dashboard/").content.decode()
    assert page.count("data-push=") == 2
    fast = page[page.index(">fast<"):page.index(">stuck<")]
    assert "400 MB / 1000 MB" in fast and "40 %" in fast and "52 MB/s" in fast
    assert "its worker may have died" in page[page.index(">stuck<"):]


def test_an_upload_sent_on_while_it_arrives_is_a_push_running_now_with_its_heartbeat(settings, alice, carol_client):
    stale = timezone.now() - timedelta(seconds=settings.PUSH_STALE_SECONDS + 60)
    make_upload(alice, "early", status=Status.SENDING_EARLY, size=1000, sent_bytes=100, heartbeat_at=stale,
                push_started_at=timezone.now())
    page = carol_client.get("/review/dashboard/").content.decode()
    assert page.count("data-push=") == 1 and ">early<" in page
    assert "its worker may have died" in page[page.index(">early<"):]


def test_the_dashboard_shows_at_most_twenty_pushes_and_says_how_many_run(alice, carol_client):
    for number in range(23):
        make_upload(alice, f"push-{number}", status=Status.PUSHING, push_started_at=timezone.now())
    page = carol_client.get("/review/dashboard/").content.decode()
    assert page.count("data-push=") == 20 and "The 20 longest running of 23." in page


def test_the_dashboard_needs_the_same_few_queries_however_many_uploads_there_are(
    alice, bob, carol_client, django_assert_max_num_queries
):
    def add(count: int) -> None:
        for number in range(count):
            upload = make_upload(alice if number % 2 else bob, f"u{number}", size=1000 + number,
                                 status=[Status.PUSHING, Status.FAILED, Status.READY][number % 3],
                                 push_started_at=timezone.now())
            sent(upload, number % 30)
            state.note(upload, "a line")

    add(10)
    carol_client.get("/review/dashboard/")  # session, permissions and the like once
    with django_assert_max_num_queries(12) as few:
        carol_client.get("/review/dashboard/")
    add(60)
    with django_assert_max_num_queries(len(few.captured_queries)):
        carol_client.get("/review/dashboard/")


# ---------------------------------------------------------------------------------------------
# Workers and queues, through the broker


def test_the_page_asks_for_the_workers_separately_so_it_never_waits_on_the_broker(carol_client, monkeypatch):
    monkeypatch.setattr(dashboard, "workers_report", lambda **_: pytest.fail("the page asked the broker"))
    page = carol_client.get("/review/dashboard/").content.decode()
    assert 'data-workers-url="/review/dashboard/workers"' in page and 'href="?workers=1"' in page


def test_the_workers_that_run_answer_through_the_broker(celery_worker_process, carol_client):
    report = dashboard.workers_report()
    assert report.broker_ok and len(report.workers) == 1 and report.workers[0].startswith("celery@")
    assert set(report.queues) == {"uploads", "celery"}
    page = carol_client.get("/review/dashboard/workers").content.decode()
    assert 'data-workers-state="online"' in page and "1 worker answered" in page and report.workers[0] in page
    assert carol_client.get("/review/dashboard/workers")["Cache-Control"].startswith("max-age=0")
    assert report.workers[0] in carol_client.get("/review/dashboard/", {"workers": 1}).content.decode()  # no JS


@pytest.fixture
def broker_without_workers(test_broker, monkeypatch):
    """The test Redis under a key prefix no worker listens on."""
    from portal.celery import app

    prefix = f"ims-portal-test-dash-{uuid.uuid4().hex[:8]}:"
    monkeypatch.setattr(app.conf, "broker_transport_options",
                        {**app.conf.broker_transport_options, "global_keyprefix": prefix})
    yield app
    import redis

    client = redis.Redis.from_url(test_broker)
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)


def test_no_worker_answering_is_said_plainly_with_the_messages_waiting(broker_without_workers, carol_client):
    app = broker_without_workers
    with app.connection_for_write() as connection:
        for name in dashboard.QUEUES:  # as a worker declares them when it starts (then it died)
            Queue(name, Exchange(name), routing_key=name)(connection.default_channel).declare()
        for _ in range(3):
            app.send_task("uploads.tasks.clean_staging", connection=connection)
        app.send_task("uploads.tasks.push_upload", args=[0], connection=connection)
    started = time.monotonic()
    page = carol_client.get("/review/dashboard/workers").content.decode()
    assert time.monotonic() - started < dashboard.WORKER_PING_SECONDS + 2
    assert 'data-workers-state="none"' in page and "No worker answered within 1 second." in page
    assert 'data-queue="celery">3<' in page and 'data-queue="uploads">1<' in page


def test_redis_down_gives_a_message_not_an_error(carol_client, monkeypatch):
    from portal.celery import app

    monkeypatch.setattr(app.conf, "broker_url", "redis://:s3cret-pw@127.0.0.1:1/0")  # nothing listens there
    started = time.monotonic()
    response = carol_client.get("/review/dashboard/workers")
    page = response.content.decode()
    assert response.status_code == 200 and time.monotonic() - started < 5
    assert 'data-workers-state="broker-down"' in page and "The broker (Redis) did not answer" in page
    assert "s3cret-pw" not in page
    assert carol_client.get("/review/dashboard/", {"workers": 1}).status_code == 200
