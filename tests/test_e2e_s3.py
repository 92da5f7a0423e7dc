"""End to end with object staging: tuspy → /tus/ → Swift (multipart) → a real Celery worker that
streams the object to the IMS simulator; and an upload that goes on on another web process."""

import hashlib
import io
import os
import signal
import subprocess
import sys
import uuid

import pytest
import requests
from tusclient.client import TusClient

from tests.conftest import (KEY_PREFIX, ROOT, Worker, _database_url, _wait_for_worker_sessions_to_end, connect_cloud,
                            make_image, tus_headers, wait_for)
from tests.s3_fixture import PART, multipart_uploads_under, objects_under
from tests.test_e2e import wait_until_finished
from uploads.models import Status, Upload

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _portal_env(store, prefix: str, session_sim, test_broker, tmp_path) -> dict:
    from django.db import connection
    from django.conf import settings

    return {
        **os.environ, **store.env(prefix),
        "STAGING_S3_PART_SIZE": str(PART), "STAGING_SCRATCH_DIR": str(tmp_path / "scratch"),
        "STAGING_FREE_RESERVE_BYTES": "0",
        "DATABASE_URL": _database_url(connection.settings_dict), "REDIS_URL": test_broker,
        "TEST_KEY_PREFIX": KEY_PREFIX, "IMS_ENDPOINT": session_sim.url, "IAM_ENDPOINT": f"{session_sim.url}/v3",
        "TOKEN_ENCRYPTION_KEY": settings.TOKEN_ENCRYPTION_KEY, "SECRET_KEY": settings.SECRET_KEY,
        "UPLOAD_POLL_SECONDS": "0.5", "LOG_LEVEL": "INFO",
    }


def start_s3_worker(swift_store, session_sim, tmp_path_factory, test_broker, **extra_env) -> Worker:
    """A real Celery worker staging in Swift, under a prefix of its own (one per test module:
    two would take each other's messages)."""
    folder = tmp_path_factory.mktemp("s3-worker")
    prefix = f"e2e-{uuid.uuid4().hex[:8]}/"
    env = {**_portal_env(swift_store, prefix, session_sim, test_broker, folder), **extra_env}
    worker = Worker(env, folder / "worker.log").start()
    worker.prefix, worker.env = prefix, env
    return worker


@pytest.fixture(scope="module")
def s3_worker(swift_store, django_db_setup, django_db_blocker, session_sim, tmp_path_factory, test_broker):
    worker = start_s3_worker(swift_store, session_sim, tmp_path_factory, test_broker)
    yield worker
    worker.stop()
    with django_db_blocker.unblock():
        _wait_for_worker_sessions_to_end()


@pytest.fixture
def e2e_s3(s3_worker, swift_store, settings, transactional_db, sim, tmp_path):
    settings.STORAGES = {
        **settings.STORAGES,
        "staging": {"BACKEND": "storages.backends.s3.S3Storage",
                    "OPTIONS": swift_store.storage_options(s3_worker.prefix)},
    }
    settings.STAGING_S3_PART_SIZE = PART
    settings.STAGING_SCRATCH_DIR = str(tmp_path / "scratch")
    return s3_worker


def test_a_tus_upload_into_object_staging_ends_ready_with_the_same_md5(e2e_s3, swift_store, live_server, client,
                                                                        alice, sim, tmp_path):
    connect_cloud(alice)
    client.force_login(alice)
    path = make_image(tmp_path / "disk.raw", 2 * PART + 4321)
    tus = TusClient(f"{live_server.url}/tus/", headers=tus_headers(client))
    # Chunks that are no multiple of the part size: every part but the first starts in an incomplete one.
    uploader = tus.uploader(str(path), chunk_size=3 * 1024 * 1024 + 1, metadata={"filename": path.name})
    uploader.upload()
    upload = wait_until_finished(Upload.objects.get(uid=uploader.url.rstrip("/").rsplit("/", 1)[-1]))
    assert upload.status == Status.READY, (upload.error_message, e2e_s3.output()[-3000:])
    [image] = sim.images()
    assert image["checksum"] == hashlib.md5(path.read_bytes()).hexdigest() == upload.md5
    assert multipart_uploads_under(swift_store, e2e_s3.prefix) == []


# Django's runserver, sending its Celery messages with this session's key prefix (as the worker reads them).
WEB_MAIN = (
    "import os, sys; os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'portal.settings'); "
    "from portal.celery import app; "
    "app.conf.broker_transport_options = {**app.conf.broker_transport_options, "
    "'global_keyprefix': os.environ['TEST_KEY_PREFIX']}; "
    "from django.core.management import execute_from_command_line; "
    "execute_from_command_line(['manage.py', *sys.argv[1:]])"
)


@pytest.fixture
def second_web_process(e2e_s3, tmp_path):
    """Another web process (Django's runserver) on the same database and object storage."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(tmp_path / "web2.log", "wb")
    process = subprocess.Popen([sys.executable, "-c", WEB_MAIN, "runserver", "--noreload", f"127.0.0.1:{port}"],
                               cwd=ROOT, env={**e2e_s3.env, "DEBUG": "0"}, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def answers():
        try:
            return requests.options(f"{url}/tus/", timeout=1).status_code == 204
        except requests.RequestException:
            return False

    try:
        wait_for(answers, timeout=30, what="the second web process")
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
        log.close()


def test_an_upload_goes_on_on_another_web_process(e2e_s3, swift_store, second_web_process, live_server, client,
                                                  alice, sim, tmp_path):
    connect_cloud(alice)
    client.force_login(alice)
    data = (tmp_path / "disk.raw")
    make_image(data, PART + 3 * 1024 * 1024)
    body = data.read_bytes()
    headers = {**tus_headers(client), "Tus-Resumable": "1.0.0"}
    created = requests.post(f"{live_server.url}/tus/", headers={
        **headers, "Upload-Length": str(len(body)), "Upload-Metadata": "filename ZGlzay5yYXc="})
    assert created.status_code == 201, created.text
    path = created.headers["Location"].split("/tus/", 1)[1]
    first = 2 * 1024 * 1024 + 17  # less than a part: it waits in an incomplete part object
    patch = {**headers, "Content-Type": "application/offset+octet-stream"}
    assert requests.patch(f"{live_server.url}/tus/{path}", data=body[:first],
                          headers={**patch, "Upload-Offset": "0"}).status_code == 204
    # The other process knows where the upload stands, and takes it to the end.
    head = requests.head(f"{second_web_process}/tus/{path}", headers=headers)
    assert head.headers["Upload-Offset"] == str(first)
    rest = requests.patch(f"{second_web_process}/tus/{path}", data=body[first:],
                          headers={**patch, "Upload-Offset": str(first)})
    assert rest.status_code == 204, rest.text
    upload = wait_until_finished(Upload.objects.get())
    assert upload.status == Status.READY, (upload.error_message, e2e_s3.output()[-3000:])
    assert sim.images()[0]["checksum"] == hashlib.md5(body).hexdigest() == upload.md5
    left = objects_under(swift_store, e2e_s3.prefix)
    assert left[upload.staged_name] == len(body)
    assert not [key for key in left if ".part-" in key]  # no incomplete part left behind


def test_object_storage_down_during_a_push_then_back_ends_ready(e2e_s3, swift_store, alice, sim, monkeypatch):
    """The real worker meets the store away: a plain temporary fault, retried with backoff;
    once the store is back, the same upload ends Ready with the same MD5."""
    from uploads import services

    connect_cloud(alice)
    data = bytes(512) + os.urandom(PART + 1000)
    queued = []
    with monkeypatch.context() as patched:  # stage without queueing the push yet
        patched.setattr(services.dispatch, "enqueue_push", lambda upload_id, countdown=None: queued.append(upload_id))
        upload = services.upload_create(owner=alice, size=len(data), filename="down.raw", name="down",
                                        disk_format="raw", min_disk=1)
        services.upload_receive(upload=upload, offset=0, stream=io.BytesIO(data), length=len(data))
    assert queued == [upload.pk]
    swift_store.stop(["proxy"])
    try:
        services.dispatch.enqueue_push(upload.pk)

        def waiting_to_retry():
            upload.refresh_from_db()
            return upload.status == Status.RECEIVED and upload.retry_at is not None

        wait_for(waiting_to_retry, timeout=60, what="the push to fail for the store being away")
        assert "cannot reach its file storage" in upload.error_message
    finally:
        swift_store.start(["proxy"])
    upload = wait_until_finished(upload, timeout=90)
    assert upload.status == Status.READY, (upload.error_message, e2e_s3.output()[-3000:])
    assert upload.md5 == hashlib.md5(data).hexdigest() == sim.images()[0]["checksum"]
