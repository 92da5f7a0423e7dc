"""The whole corpus of tests/test_inspect.py through the real pipeline: each good image ends ready
(converted first when IMS does not take its format) with matching checksums, in the simulator
and in real Glance; each hostile or mislabelled one is refused before any request to IMS.

ISO images are refused at the door instead: the portal does not take .iso files (IMS's list of
upload formats has none), and says which endings it takes.
"""

import io
import shutil

import pytest

from tests.test_inspect import GOOD, REFUSED, corpus  # noqa: F401  (corpus: a session fixture)
from uploads import services
from uploads.models import Status, Upload

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img (Debian's qemu-utils)"),
]

UPLOADABLE = [sample for sample in GOOD if sample.declared != "iso"]


def received(owner, path, disk_format: str) -> Upload:
    data = path.read_bytes()
    upload = services.upload_create(owner=owner, size=len(data), filename=path.name, name=path.stem,
                                    disk_format=disk_format)
    services.upload_receive(upload=upload, offset=0, stream=io.BytesIO(data), length=len(data))
    return upload


def pushed(owner, path, disk_format: str) -> Upload:
    upload = received(owner, path, disk_format)
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    return upload


@pytest.mark.parametrize("sample", UPLOADABLE, ids=str)
def test_a_good_image_ends_ready_in_the_simulator(sample, corpus, alice_connected, sim):  # noqa: F811
    upload = pushed(alice_connected, corpus / sample.file, sample.declared)
    assert upload.status == Status.READY, f"{upload.error_message} {upload.events.last().detail}"
    assert upload.detected_format == sample.detected
    [image] = sim.images()
    assert image["checksum"] == upload.md5 and image["size"] == upload.send_size


@pytest.mark.parametrize("sample", REFUSED, ids=str)
def test_a_bad_image_is_refused_before_any_request_to_ims(sample, corpus, alice_connected, sim):  # noqa: F811
    upload = pushed(alice_connected, corpus / sample.file, sample.declared)
    assert upload.status == Status.REFUSED
    assert upload.error_code == sample.problem
    assert upload.error_message and upload.error_hint
    assert [r for r in sim.requests_seen() if r["path"].startswith("/v2")] == []


@pytest.mark.openstack
@pytest.mark.parametrize("sample", UPLOADABLE, ids=str)
def test_a_good_image_ends_active_in_glance(sample, corpus, openstack_peers, settings, alice, db):  # noqa: F811
    settings.IMS_ENDPOINT = openstack_peers.glance_url
    settings.IAM_ENDPOINT = openstack_peers.keystone_url
    services.cloud_account_connect(user=alice, domain="Default", user_name="demo", password="demopw",
                                   project="demo")
    upload = pushed(alice, corpus / sample.file, sample.declared)
    assert upload.status == Status.READY, (upload.error_message, [e.detail for e in upload.events.all()][-3:])
    image = services.cloud.ims_client(services.cloud.owner_token(alice.pk).value).get_image(upload.ims_image_id)
    assert image.status == "active" and image.raw["disk_format"] == upload.send_format
    assert image.checksum == upload.md5 and image.os_hash_value == upload.sha512


@pytest.mark.parametrize("sample", [s for s in GOOD if s.declared == "iso"], ids=str)
def test_an_iso_is_refused_at_the_door_with_the_formats_that_are_taken(sample, corpus, client, alice_with_token):  # noqa: F811
    import base64

    client.force_login(alice_with_token)
    name = base64.b64encode(sample.file.encode()).decode()
    response = client.post("/tus/", headers={"Tus-Resumable": "1.0.0", "Upload-Length": "1000",
                                             "Upload-Metadata": f"filename {name}"})
    assert response.status_code == 400
    assert "is not a disk image file this portal knows" in response.content.decode()
    assert not Upload.objects.exists()
