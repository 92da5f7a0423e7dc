"""IMS's import from OBS (uploads/obs_import.py): with object staging and IMS_IMPORT_FROM_OBS, the
worker registers the staged object with IMS (POST /v2/cloudimages/action) and follows the job;
the simulator reads the object from the Swift store the tests run."""

import hashlib
import os

import pytest

from tests.s3_fixture import ACCESS_KEY, REGION, SECRET_KEY
from tests.test_pipeline import received_upload, timeline
from uploads import obs_import as obs_import_module, services
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


def disk_image(tmp_path, disk_format: str) -> bytes:
    """A small disk with data in it, in `disk_format` (made by qemu-img)."""
    import subprocess

    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as out:
        out.truncate(64 * 1024**2)
        out.seek(1024**2)
        out.write(os.urandom(256 * 1024))
    target = tmp_path / f"disk.{disk_format}"
    driver = {"vhd": "vpc"}.get(disk_format, disk_format)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", driver, str(raw), str(target)], check=True,
                   capture_output=True)
    return target.read_bytes()


@pytest.mark.parametrize("disk_format", ["qcow2", "vmdk", "vhd", "vhdx", "qed", "vdi", "qcow"])
def test_every_format_ims_imports_goes_as_it_is(alice_connected, obs_import, tmp_path, disk_format):
    data = disk_image(tmp_path, disk_format)
    upload = received_upload(alice_connected, data, disk_format=disk_format)
    assert upload.staged_name.endswith("." + obs_import_module.IMPORT_EXTENSIONS[disk_format])
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.READY, upload.error_message
    assert (upload.send_format, upload.converted_name) == (disk_format, "")  # IMS converts, not the portal
    [image] = obs_import.images()
    assert image["disk_format"] == disk_format and image["checksum"] == hashlib.md5(data).hexdigest() == upload.md5
    assert "PUT" not in [r["method"] for r in obs_import.requests_seen()]


def test_a_pass_through_format_is_imported_as_declared(alice_connected, obs_import):
    upload = received_upload(alice_connected, DATA, disk_format="zvhd2")
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.READY, upload.error_message
    [image] = obs_import.images()
    assert image["disk_format"] == "zvhd2" and upload.staged_name.endswith(".zvhd2")


def test_a_file_sent_as_another_format_than_declared_is_converted_and_imported_as_qcow2(
    alice_connected, obs_import, tmp_path
):
    data = disk_image(tmp_path, "vmdk")
    upload = received_upload(alice_connected, data, disk_format="qcow2")  # named .qcow2, but a VMDK
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.REFUSED and upload.suggested_format == "vmdk"
    services.upload_use_format(upload=upload, disk_format="vmdk", by="alice")
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.READY, upload.error_message
    assert upload.send_format == "qcow2" and upload.converted_name.endswith(".qcow2")
    [image] = obs_import.images()
    assert image["disk_format"] == "qcow2"
    assert "PUT" not in [r["method"] for r in obs_import.requests_seen()]
