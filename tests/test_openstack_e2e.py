"""The portal against real OpenStack: Keystone gives the token (from a user's password, through
the Cloud account page) and Glance takes the upload, inspects it and reports its checksums.

Glance runs the same image API as IMS. The push runs in this process through the same service
the Celery worker calls (the real worker is exercised in test_e2e.py against the simulator): the
session's worker is pointed at the simulator, so the enqueue is caught here instead.
"""

import hashlib
import shutil
import subprocess

import pytest

from tests.test_e2e import tus_upload
from uploads import services
from uploads.models import Status, Upload

pytestmark = [pytest.mark.openstack, pytest.mark.slow]

KEYSTONE_DEMO = {"domain": "Default", "user_name": "demo", "password": "demopw", "project": "demo"}


@pytest.fixture
def portal_on_openstack(openstack_peers, settings, transactional_db, task_queue):
    settings.IMS_ENDPOINT = openstack_peers.glance_url
    settings.IAM_ENDPOINT = openstack_peers.keystone_url
    return task_queue


def qcow2_image(tmp_path, megabytes: int = 8):
    if not shutil.which("qemu-img"):
        pytest.fail("qemu-img is needed (Debian package qemu-utils); `make test` installs it")
    raw = tmp_path / "source.raw"
    with open(raw, "wb") as out:
        out.truncate(megabytes * 1024 * 1024)
        out.seek(1024 * 1024)
        out.write(b"portal-test-data" * 65536)  # 1 MiB that is not zero, so the qcow2 has data
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(image)], check=True)
    return image


def connect_with_password(client) -> None:
    response = client.post("/cloud/", KEYSTONE_DEMO)
    assert response.status_code == 302, response.content.decode()[:2000]


def test_an_upload_reaches_active_in_glance_with_the_same_checksums(
    portal_on_openstack, openstack_peers, live_server, client, alice, tmp_path
):
    client.force_login(alice)
    connect_with_password(client)
    path = qcow2_image(tmp_path)
    upload = tus_upload(live_server, client, path, image_name="glance e2e",
                        os_version="Ubuntu 22.04 server 64bit", min_disk="1")
    assert portal_on_openstack == [("push", upload.pk)]
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.READY, upload.error_message
    data = path.read_bytes()
    image = services.cloud.ims_client(services.cloud.owner_token(alice.pk).value).get_image(upload.ims_image_id)
    assert image.status == "active"
    assert image.size == len(data)
    assert image.checksum == hashlib.md5(data).hexdigest() == upload.md5
    assert image.os_hash_value == hashlib.sha512(data).hexdigest() == upload.sha512
    assert image.raw["disk_format"] == "qcow2"
    assert image.raw["__os_version"] == "Ubuntu 22.04 server 64bit"


def test_contents_that_are_no_disk_image_are_refused_before_glance_sees_them(
    portal_on_openstack, openstack_peers, live_server, client, alice, tmp_path
):
    client.force_login(alice)
    connect_with_password(client)
    path = tmp_path / "fake.qcow2"
    path.write_bytes(b"not a qcow2 at all" * 1000)
    upload = tus_upload(live_server, client, path)
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.REFUSED
    assert "QCOW2" in upload.error_message and not upload.ims_image_id
    # Glance (which would answer 415 and keep a broken image) was never asked.
    client = services.cloud.ims_client(services.cloud.owner_token(alice.pk).value)
    images = client.session.get(f"{openstack_peers.glance_url}/v2/images")
    assert images.json()["images"] == [] or all(i["name"] != upload.name for i in images.json()["images"])


def test_a_vmdk_is_converted_and_reaches_active_in_glance_as_qcow2(
    portal_on_openstack, live_server, client, alice, tmp_path
):
    client.force_login(alice)
    connect_with_password(client)
    source = qcow2_image(tmp_path)
    vmdk = tmp_path / "legacy.vmdk"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "vmdk", str(source), str(vmdk)], check=True)
    upload = tus_upload(live_server, client, vmdk)
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.READY, upload.error_message
    assert (upload.detected_format, upload.send_format) == ("vmdk", "qcow2")
    image = services.cloud.ims_client(services.cloud.owner_token(alice.pk).value).get_image(upload.ims_image_id)
    assert image.raw["disk_format"] == "qcow2"
    assert image.checksum == upload.md5 and image.os_hash_value == upload.sha512


def test_a_wrong_password_is_refused_by_keystone(portal_on_openstack, client, alice):
    client.force_login(alice)
    response = client.post("/cloud/", {**KEYSTONE_DEMO, "password": "wrong"})
    assert "did not accept these details" in response.content.decode()
    assert not Upload.objects.exists()
