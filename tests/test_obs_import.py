"""IMS's import from OBS (uploads/obs_import.py): with object staging and IMS_IMPORT_FROM_OBS, the
worker registers the staged object with IMS (POST /v2/cloudimages/action) and follows the job;
the simulator reads the object from the Swift store the tests run."""

import hashlib
import os

import pytest

from tests.s3_fixture import ACCESS_KEY, REGION, SECRET_KEY
from tests.test_pipeline import received_upload, timeline
from uploads import services
from uploads.models import Status, Upload

DATA = bytes(512) + os.urandom(6 * 1024**2)


@pytest.fixture
def obs_import(object_staging, sim, settings):
    settings.IMS_IMPORT_FROM_OBS = True
    settings.IMS_IMPORT_POLL_SECONDS = 0.05
    sim.set_obs(endpoint_url=object_staging.endpoint, access_key=ACCESS_KEY, secret_key=SECRET_KEY, region=REGION)
    yield sim
    sim.obs = None


def ims_calls(sim) -> list[tuple[str, str]]:
    return [(r["method"], r["path"].split("/")[1] + "/" + r["path"].split("/")[2]) for r in sim.requests_seen()]


def test_the_import_from_obs_ends_ready_with_the_same_md5_and_no_put(alice_connected, obs_import):
    upload = received_upload(alice_connected, DATA)
    assert services.upload_push(upload_id=upload.pk).retry_in is None
    upload.refresh_from_db()
    assert upload.status == Status.READY, upload.error_message
    [image] = obs_import.images()
    assert image["id"] == upload.ims_image_id
    assert image["checksum"] == hashlib.md5(DATA).hexdigest() == upload.md5
    assert open(image["path"], "rb").read() == DATA
    methods = [r["method"] for r in obs_import.requests_seen()]
    assert "PUT" not in methods
    assert ("POST", "v2/cloudimages") in ims_calls(obs_import)
    messages = timeline(upload)
    assert any(m.startswith("IMS is importing the file from OBS (job ") for m in messages)
    assert f"IMS imported the file from OBS as image {image['id']}" in messages


def test_ims_without_access_to_obs_is_explained_and_leaves_no_image(alice_connected, obs_import):
    obs_import.set_faults(fail_imports=1)
    upload = received_upload(alice_connected, DATA)
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.FAILED
    assert upload.error_message == "IMS may not read the file from the portal's OBS bucket."
    assert "authorize IMS to access OBS" in upload.error_hint
    assert obs_import.images() == []
    assert upload.has_staged_copy  # kept for Retry once access is granted


def test_without_the_setting_the_file_is_sent_by_put(alice_connected, object_staging, sim, settings):
    settings.IMS_IMPORT_FROM_OBS = False
    upload = received_upload(alice_connected, DATA)
    services.upload_push(upload_id=upload.pk)
    assert Upload.objects.get().status == Status.READY
    assert "PUT" in [r["method"] for r in sim.requests_seen()]
    assert ("POST", "v2/cloudimages") not in ims_calls(sim)


def test_the_pages_say_ims_is_importing():
    assert Upload(status=Status.PUSHING, ims_status="importing").phase_detail == "IMS is importing the file from OBS"
