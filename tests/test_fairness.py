"""Workers shared fairly: caps on pushes per person and per cloud project, waiting uploads that
start by themselves, slots freed by dead workers, and beat's tasks safe to run twice at once."""

import io
import os
import re
import threading
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from django.db import connection
from django.test import Client
from django.utils import timezone
from tusclient.client import TusClient

from tests.conftest import connect_cloud, make_image, tus_headers, wait_for
from tests.fault_stack import FaultStack, fault_stack, faults_stack  # noqa: F401  (fixtures)
from uploads import fairness, services, tasks
from uploads.models import Status, Upload, UploadEvent

MiB = 1024 * 1024
DATA = bytes(512) + os.urandom(200_000)  # a raw disk: an empty boot sector, then data


def received_upload(owner, data: bytes = DATA, name: str = "disk") -> Upload:
    upload = services.upload_create(owner=owner, size=len(data), filename=f"{name}.raw", name=name,
                                    disk_format="raw", min_disk=1)
    services.upload_receive(upload=upload, offset=0, stream=io.BytesIO(data), length=len(data))
    upload.refresh_from_db()
    assert upload.status == Status.RECEIVED
    return upload


def held_by_a_worker(upload: Upload, *, heartbeat_age: timedelta = timedelta(0)) -> Upload:
    """As if a worker were sending it; its heartbeat `heartbeat_age` old."""
    Upload.objects.filter(pk=upload.pk).update(status=Status.PUSHING, attempt=1,
                                               heartbeat_at=timezone.now() - heartbeat_age)
    upload.refresh_from_db()
    return upload


def status_of(upload: Upload) -> str:
    return Upload.objects.values_list("status", flat=True).get(pk=upload.pk)


def detail_of(client, upload: Upload) -> str:
    return client.get(f"/uploads/{upload.uid}/status").json()["detail"]


@pytest.fixture
def bob_connected(bob, sim):
    connect_cloud(bob)  # the simulator's demo account: the same cloud project as alice's
    return bob


def in_threads(*calls, timeout: float = 60) -> list:
    """Run each call in a thread of its own, all let go at the same moment; their results."""
    start = threading.Barrier(len(calls))
    results = [None] * len(calls)

    def run(index, call):
        try:
            start.wait()
            results[index] = call()
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(i, call)) for i, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
        assert not thread.is_alive(), "a call did not end"
    return results


# ---------------------------------------------------------------------------------------------
# The caps


def test_an_upload_over_the_persons_cap_waits_received_and_says_how_many_are_ahead(
    alice_connected, sim, client, task_queue
):
    client.force_login(alice_connected)
    sending = [held_by_a_worker(received_upload(alice_connected, name=f"busy{i}")) for i in range(2)]
    third, fourth = received_upload(alice_connected, name="third"), received_upload(alice_connected, name="fourth")
    task_queue.clear()

    for upload in (third, fourth):
        assert services.upload_push(upload_id=upload.pk).retry_in is None  # no retry loop: it waits
        assert status_of(upload) == Status.RECEIVED
    assert task_queue == []  # and nothing queued it again
    assert [r for r in sim.requests_seen() if r["path"].startswith("/v2")] == []  # IMS was not asked
    assert detail_of(client, third) == "Waiting to send: yours is next"
    assert detail_of(client, fourth) == "Waiting to send: 1 upload ahead of yours"
    assert not detail_of(client, sending[0]).startswith("Waiting to send")
    page = client.get("/uploads/").content.decode()  # the page says it too, before its first poll
    assert "Waiting to send: yours is next" in page and "Waiting to send: 1 upload ahead of yours" in page


def test_the_cap_is_a_setting(alice_connected, sim, settings, task_queue):
    settings.PUSH_CONCURRENCY_PER_USER = 3
    for i in range(2):
        held_by_a_worker(received_upload(alice_connected, name=f"busy{i}"))
    third = received_upload(alice_connected, name="third")
    services.upload_push(upload_id=third.pk)
    assert status_of(third) == Status.READY


def test_the_cloud_projects_cap_holds_across_people(alice_connected, bob_connected, sim, settings, client,
                                                    task_queue):
    settings.PUSH_CONCURRENCY_PER_PROJECT = 2
    alices = [held_by_a_worker(received_upload(alice_connected, name=f"a{i}")) for i in range(2)]
    alices_waiting = received_upload(alice_connected, name="a-waiting")
    bobs = received_upload(bob_connected, name="b")
    services.upload_push(upload_id=bobs.pk)
    assert status_of(bobs) == Status.RECEIVED
    client.force_login(bob_connected)
    # Ahead of Bob's: alice's waiting upload in the same (full) project, created before his.
    assert detail_of(client, bobs) == "Waiting to send: 1 upload ahead of yours"

    settings.PUSH_CONCURRENCY_PER_PROJECT = 3
    services.upload_push(upload_id=bobs.pk)
    assert status_of(bobs) == Status.READY
    assert status_of(alices[0]) == Status.PUSHING and status_of(alices_waiting) == Status.RECEIVED


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("cap", ["person", "project"])
def test_concurrent_claims_never_pass_the_cap(cap, alice_connected, django_user_model, sim, settings, task_queue,
                                              monkeypatch):
    if cap == "person":
        owners = [alice_connected]
    else:  # three people of one cloud project, each with room of their own
        settings.PUSH_CONCURRENCY_PER_USER, settings.PUSH_CONCURRENCY_PER_PROJECT = 5, 2
        owners = [alice_connected] + [django_user_model.objects.create_user(f"user{i}") for i in range(2)]
        for owner in owners[1:]:
            connect_cloud(owner)
    uploads = [received_upload(owners[i % len(owners)], name=f"u{i}") for i in range(6)]
    release = threading.Event()

    def hold_the_slot(upload, token, attempt):  # a push that lasts until the test says so
        release.wait(30)
        return services.PushOutcome()

    monkeypatch.setattr(services.push, "push_claimed", hold_the_slot)
    returned = []
    calls = [lambda pk=u.pk: returned.append(services.upload_push(upload_id=pk)) for u in uploads]
    claims = threading.Thread(target=in_threads, args=calls)
    claims.start()
    try:
        # Every call has either given up (the cap) or holds its slot until released.
        wait_for(lambda: len(returned) + Upload.objects.filter(status=Status.CHECKING).count() == len(uploads),
                 timeout=30, what="every claim to be decided")
        assert Upload.objects.filter(status=Status.CHECKING).count() == 2
        assert Upload.objects.filter(status=Status.RECEIVED).count() == len(uploads) - 2
    finally:
        release.set()
        claims.join(60)


# ---------------------------------------------------------------------------------------------
# Slots that free


def test_a_dead_workers_slot_frees_once_its_heartbeat_is_stale(alice_connected, sim, settings, task_queue):
    fresh = held_by_a_worker(received_upload(alice_connected, name="alive"))
    dead = held_by_a_worker(received_upload(alice_connected, name="dead"),
                            heartbeat_age=timedelta(seconds=settings.PUSH_STALE_SECONDS - 30))
    waiting = received_upload(alice_connected, name="waiting")
    Upload.objects.filter(pk=waiting.pk).update(status_changed_at=timezone.now() - timedelta(hours=1))
    services.upload_push(upload_id=waiting.pk)
    assert status_of(waiting) == Status.RECEIVED
    assert waiting.pk not in services.uploads_to_reconcile()  # no free slot: nothing to nudge

    Upload.objects.filter(pk=dead.pk).update(heartbeat_at=timezone.now() - timedelta(hours=1))
    # The reconciler nudges the dead push (to be taken over) and the waiting upload (a slot is free).
    assert sorted(services.uploads_to_reconcile()) == sorted([dead.pk, waiting.pk])
    services.upload_push(upload_id=waiting.pk)
    assert status_of(waiting) == Status.READY
    assert status_of(fresh) == Status.PUSHING


@pytest.mark.django_db(transaction=True)
def test_a_waiting_upload_is_queued_as_soon_as_a_push_of_its_owner_ends(alice_connected, sim, settings,
                                                                        task_queue):
    settings.PUSH_CONCURRENCY_PER_USER = 1
    sim.set_faults(put_bytes_per_second=MiB)
    first = received_upload(alice_connected, bytes(512) + os.urandom(2 * MiB), name="first")
    second = received_upload(alice_connected, name="second")
    task_queue.clear()
    pusher = threading.Thread(target=lambda: (services.upload_push(upload_id=first.pk), connection.close()))
    pusher.start()
    wait_for(lambda: status_of(first) == Status.PUSHING, timeout=20, what="the first push")

    services.upload_push(upload_id=second.pk)  # its message: no slot, so it waits
    assert status_of(second) == Status.RECEIVED and task_queue == []
    pusher.join(30)
    assert status_of(first) == Status.READY
    assert task_queue == [("push", second.pk)]  # queued by the push that ended, with nobody's help
    services.upload_push(upload_id=second.pk)
    assert status_of(second) == Status.READY


def test_someone_with_pushes_running_gives_way_to_someone_with_none(alice_connected, bob_connected, sim,
                                                                    task_queue):
    held_by_a_worker(received_upload(alice_connected, name="a-running"))
    alices = received_upload(alice_connected, name="a-next")
    bobs = received_upload(bob_connected, name="b")
    task_queue.clear()
    services.upload_push(upload_id=alices.pk)  # alice has a slot left, but bob has none running
    assert status_of(alices) == Status.RECEIVED
    assert task_queue == [("push", bobs.pk)]
    services.upload_push(upload_id=bobs.pk)
    assert status_of(bobs) == Status.READY
    assert ("push", alices.pk) in task_queue  # bob's push ended: alice's is next
    services.upload_push(upload_id=alices.pk)
    assert status_of(alices) == Status.READY


def test_many_waiting_uploads_of_one_person_do_not_hide_another_persons(alice_connected, bob_connected, sim,
                                                                         monkeypatch, task_queue):
    monkeypatch.setattr(fairness, "LOOK_AHEAD", 2)  # as if alice had hundreds waiting
    for i in range(2):
        held_by_a_worker(received_upload(alice_connected, name=f"a-running{i}"))
    alices = [received_upload(alice_connected, name=f"a{i}") for i in range(3)]
    bobs = received_upload(bob_connected, name="b")
    Upload.objects.update(status_changed_at=timezone.now() - timedelta(hours=1))
    assert services.uploads_to_reconcile() == [bobs.pk]  # alice has no free slot; bob has
    assert fairness.next_after(alices[0]) == [bobs.pk]


# ---------------------------------------------------------------------------------------------
# Beat runs exactly once, but its tasks are safe to run twice at once


@pytest.mark.django_db(transaction=True)
def test_polling_twice_at_once_hands_out_each_due_upload_once(alice_connected):
    due = []
    for i in range(5):
        upload = received_upload(alice_connected, name=f"p{i}")
        Upload.objects.filter(pk=upload.pk).update(status=Status.PROCESSING, next_poll_at=timezone.now())
        due.append(upload.pk)
    first, second = in_threads(services.uploads_due_for_poll, services.uploads_due_for_poll)
    assert sorted(first + second) == sorted(due)


@pytest.mark.django_db(transaction=True)
def test_cleaning_twice_at_once_expires_and_deletes_each_upload_once(alice_connected, settings, staging_dir,
                                                                     task_queue):
    expired = services.upload_create(owner=alice_connected, size=10, filename="e.raw", name="e", disk_format="raw")
    Upload.objects.filter(pk=expired.pk).update(created_at=timezone.now() - timedelta(days=30))
    cancelled = received_upload(alice_connected, name="c")
    services.upload_cancel(upload=cancelled, by="alice")
    in_threads(tasks.clean_staging, tasks.clean_staging)
    assert status_of(expired) == Status.FAILED
    for upload in (expired, cancelled):
        assert not (staging_dir / upload.staged_name).exists()
        messages = list(UploadEvent.objects.filter(upload=upload).values_list("message", flat=True))
        assert len([m for m in messages if m.startswith("Deleted the staged copy")]) == 1, messages
    assert UploadEvent.objects.filter(upload=expired, to_status=Status.FAILED).count() == 1


@pytest.mark.django_db(transaction=True)
def test_reconciling_twice_at_once_sends_a_lost_upload_once(alice_connected, sim, monkeypatch, task_queue):
    lost = received_upload(alice_connected, name="lost")
    Upload.objects.filter(pk=lost.pk).update(status_changed_at=timezone.now() - timedelta(hours=1))
    queued = []
    monkeypatch.setattr(tasks, "push_upload", SimpleNamespace(delay=queued.append))
    in_threads(tasks.reconcile_uploads, tasks.reconcile_uploads)
    assert queued == [lost.pk, lost.pk]
    in_threads(*[lambda pk=pk: services.upload_push(upload_id=pk) for pk in queued])
    lost.refresh_from_db()
    assert lost.status == Status.READY and lost.attempt == 1
    assert len(sim.images()) == 1
    assert UploadEvent.objects.filter(upload=lost, to_status=Status.CHECKING).count() == 1


# ---------------------------------------------------------------------------------------------
# For real: two worker processes, separate beat, the simulator over HTTP


def tus_upload(stack: FaultStack, client, path: Path) -> Upload:
    uploader = TusClient(f"{stack.web_url}/tus/", headers=tus_headers(client)).uploader(
        str(path), chunk_size=8 * MiB, metadata={"filename": path.name})
    uploader.upload()
    return Upload.objects.get(uid=uploader.url.rstrip("/").rsplit("/", 1)[-1])


def event_time(upload: Upload, prefix: str):
    return UploadEvent.objects.filter(upload=upload, message__startswith=prefix).order_by("at").first().at


def most_at_once(intervals: list[tuple]) -> int:
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = most = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    return most


@pytest.mark.faults
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ten_uploads_of_one_person_do_not_hold_up_one_of_another(faults_stack, alice, bob, client, tmp_path):
    stack = faults_stack
    stack.start_all([stack.worker("w2")])  # two worker processes of one slot each, beat on its own
    log_start = {name: len(w.full_output()) for name, w in stack.workers.items()}
    for person in (alice, bob):
        connect_cloud(person)
    client.force_login(alice)
    bobs_client = Client()
    bobs_client.force_login(bob)
    stack.sim.set_faults(put_bytes_per_second=2 * MiB)  # each push takes about two seconds

    alices = [tus_upload(stack, client, make_image(tmp_path / f"a{i}.raw", 4 * MiB)) for i in range(10)]
    bobs = tus_upload(stack, bobs_client, make_image(tmp_path / "b.raw", 4 * MiB))
    everyone = [*alices, bobs]

    def all_done():
        return all(status_of(u) in (Status.READY, Status.FAILED, Status.RECONNECT) for u in everyone)

    wait_for(all_done, timeout=180, interval=0.2, what="all eleven uploads to end")
    logs = stack.logs_text()
    assert [status_of(u) for u in everyone] == [Status.READY] * 11, logs
    assert len(stack.sim.images()) == 11
    assert all(Upload.objects.get(pk=u.pk).attempt == 1 for u in everyone), "an upload was sent twice"

    pushes = [(event_time(u, "Checking the file"), event_time(u, "IMS received the whole file")) for u in alices]
    longest_push = max(end - start for start, end in pushes)
    bobs_wait = event_time(bobs, "Checking the file") - event_time(bobs, "All bytes received")
    # Without the caps it waits for four of alice's pushes (about 9 s); the slack is for a busy machine.
    assert bobs_wait <= longest_push + timedelta(seconds=2), (bobs_wait, longest_push, logs)
    assert most_at_once(pushes) <= 2  # alice's cap
    # Waiting uploads are queued again when a slot frees, never in a loop: a few messages each.
    runs = sum(len(re.findall(r"push_upload\[[0-9a-f-]+\] received", w.full_output()[log_start[name]:]))
               for name, w in stack.workers.items())
    assert runs <= 5 * len(everyone), f"{runs} push messages for {len(everyone)} uploads"


@pytest.mark.faults
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_worker_killed_while_holding_a_slot_loses_nothing_and_sends_nothing_twice(faults_stack, alice, client,
                                                                                      tmp_path):
    stack = faults_stack
    w1, w2 = stack.workers["w1"], stack.worker("w2")
    stack.start_all([w2])
    connect_cloud(alice)
    client.force_login(alice)
    stack.sim.set_faults(put_bytes_per_second=2 * MiB)  # six seconds a push: time to kill one midway
    uploads = [tus_upload(stack, client, make_image(tmp_path / f"k{i}.raw", 12 * MiB)) for i in range(3)]

    mine = Upload.objects.filter(pk__in=[u.pk for u in uploads])

    def two_sending():
        return mine.filter(status=Status.PUSHING, sent_bytes__gt=0).count() == 2

    wait_for(two_sending, timeout=60, interval=0.1, what="both slots to be sending")
    assert mine.filter(status=Status.RECEIVED).count() == 1  # alice's third waits for a slot
    w1.kill()  # one worker each: w1's slot is held by a push whose heartbeat stops

    def all_done():
        return all(status_of(u) in (Status.READY, Status.FAILED, Status.RECONNECT) for u in uploads)

    wait_for(all_done, timeout=180, interval=0.2, what="all three uploads to end")
    assert [status_of(u) for u in uploads] == [Status.READY] * 3, stack.logs_text()
    images = stack.sim.images()
    assert sorted(i["id"] for i in images) == sorted(Upload.objects.get(pk=u.pk).ims_image_id for u in uploads)
    for upload in uploads:
        upload.refresh_from_db()
        assert [i["checksum"] for i in images if i["id"] == upload.ims_image_id] == [upload.md5]
