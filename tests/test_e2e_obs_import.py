"""End to end through IMS's import from OBS: tuspy → /tus/ → Swift → a real worker that has the
simulator import the object (POST /v2/cloudimages/action, job) → Ready with the same MD5."""

import hashlib

import pytest
from tusclient.client import TusClient

from tests.conftest import _wait_for_worker_sessions_to_end, connect_cloud, make_image, tus_headers
from tests.s3_fixture import ACCESS_KEY, PART, REGION, SECRET_KEY
from tests.test_e2e import wait_until_finished
from tests.test_e2e_s3 import start_s3_worker
from uploads.models import Status, Upload

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def import_worker(swift_store, django_db_setup, django_db_blocker, session_sim, tmp_path_factory, test_broker):
    worker = start_s3_worker(swift_store, session_sim, tmp_path_factory, test_broker,
                             IMS_IMPORT_FROM_OBS="1", IMS_IMPORT_POLL_SECONDS="0.2")
    yield worker
    worker.stop()
    with django_db_blocker.unblock():
        _wait_for_worker_sessions_to_end()


def test_a_tus_upload_imported_from_obs_ends_ready_with_the_same_md5(import_worker, swift_store, settings,
                                                                     transactional_db, live_server, client, alice,
                                                                     sim, tmp_path):
    settings.STORAGES = {**settings.STORAGES, "staging": {
        "BACKEND": "storages.backends.s3.S3Storage", "OPTIONS": swift_store.storage_options(import_worker.prefix)}}
    settings.STAGING_S3_PART_SIZE = PART
    sim.set_obs(endpoint_url=swift_store.endpoint, access_key=ACCESS_KEY, secret_key=SECRET_KEY, region=REGION)
    try:
        connect_cloud(alice)
        client.force_login(alice)
        path = make_image(tmp_path / "disk.raw", PART + 2 * 1024 * 1024 + 5)
        tus = TusClient(f"{live_server.url}/tus/", headers=tus_headers(client))
        uploader = tus.uploader(str(path), chunk_size=2 * 1024 * 1024, metadata={"filename": path.name})
        uploader.upload()
        upload = wait_until_finished(Upload.objects.get(uid=uploader.url.rstrip("/").rsplit("/", 1)[-1]))
    finally:
        sim.obs = None
    assert upload.status == Status.READY, (upload.error_message, import_worker.output()[-3000:])
    [image] = sim.images()
    assert image["checksum"] == hashlib.md5(path.read_bytes()).hexdigest() == upload.md5
    assert "PUT" not in [r["method"] for r in sim.requests_seen()]
