"""The early push (uploads/services/early_push.py) against real Glance: an incomplete PUT never
makes an image active, so holding back the end of the file keeps an unchecked file out of the
cloud; a file the check refuses at the end leaves no image; a good one ends active with our sums.
"""

import hashlib
import socket
from urllib.parse import urlsplit

import pytest

from tests.test_early_push import MiB, Browser, Worker, qcow2_file
from tests.test_openstack_e2e import connect_with_password
from uploads import services
from uploads.models import Status, Upload
from uploads.services import images

pytestmark = [pytest.mark.openstack, pytest.mark.slow]


@pytest.fixture
def glance(openstack_peers, settings, transactional_db, task_queue, client, alice):
    """The portal pointed at Keystone and Glance, alice connected; an IMS client with her token."""
    settings.IMS_ENDPOINT = openstack_peers.glance_url
    settings.IAM_ENDPOINT = openstack_peers.keystone_url
    client.force_login(alice)
    connect_with_password(client)
    return services.cloud.ims_client(services.cloud.owner_token(alice.pk).value)


def image_ids(glance) -> set[str]:
    return {image["id"] for image in glance.session.get(f"{glance.base_url}/v2/images").json()["images"]}


def test_glance_keeps_an_image_whose_put_was_cut_before_its_end_queued_and_empty(glance):
    image = glance.create_image(name="cut put", disk_format="raw", min_disk=1)
    url = urlsplit(glance.base_url)
    with socket.create_connection((url.hostname, url.port)) as conn:
        conn.sendall((f"PUT /v2/images/{image.id}/file HTTP/1.1\r\nHost: {url.netloc}\r\n"
                      f"X-Auth-Token: {glance.session.headers['X-Auth-Token']}\r\n"
                      f"Content-Type: application/octet-stream\r\nContent-Length: {4 * MiB}\r\n\r\n").encode())
        conn.sendall(bytes(4 * MiB - 1))  # all but the last byte, then the connection ends
    stored = glance.get_image(image.id)
    for _ in range(100):  # Glance notices the cut connection a moment later
        if stored.status != "saving":
            break
        stored = glance.get_image(image.id)
    assert stored.status == "queued" and not stored.checksum and not stored.size
    glance.delete_image(image.id)


def test_an_early_push_ends_active_in_glance_with_the_same_sums(glance, alice, tmp_path):
    browser = Browser(alice, qcow2_file(tmp_path, 24), "qcow2")
    browser.send_to(2 * MiB)
    worker = Worker(browser.upload.pk)
    worker.start()
    browser.send_all()
    worker.finish(timeout=120)
    upload = Upload.objects.get(pk=browser.upload.pk)
    assert upload.status == Status.READY, upload.error_message
    assert upload.events.filter(to_status=Status.SENDING_EARLY).exists()
    image = glance.get_image(upload.ims_image_id)
    assert image.status == "active" and image.size == len(browser.data)
    assert image.checksum == hashlib.md5(browser.data).hexdigest() == upload.md5
    assert image.os_hash_value == hashlib.sha512(browser.data).hexdigest() == upload.sha512


def test_a_qcow2_refused_at_its_end_is_never_active_in_glance_and_its_image_is_deleted(
    glance, alice, tmp_path, monkeypatch
):
    before = image_ids(glance)
    whole = qcow2_file(tmp_path, 24, "whole.qcow2").read_bytes()
    path = tmp_path / "cut.qcow2"
    path.write_bytes(whole[: len(whole) - 2 * MiB])
    seen = []
    real_delete = images.delete_quietly

    def delete_quietly(upload, client):  # what Glance holds at the moment the portal deletes it
        seen.append(client.get_image(upload.ims_image_id))
        return real_delete(upload, client)

    monkeypatch.setattr(images, "delete_quietly", delete_quietly)
    browser = Browser(alice, path, "qcow2")
    browser.send_to(2 * MiB)
    worker = Worker(browser.upload.pk)
    worker.start()
    browser.send_all()
    worker.finish(timeout=120)
    upload = Upload.objects.get(pk=browser.upload.pk)
    assert upload.status == Status.REFUSED and upload.error_code == "truncated", upload.error_message
    assert [image.status for image in seen] in (["queued"], ["saving"])  # never active
    assert not seen[0].checksum
    assert image_ids(glance) == before  # nothing of it remains
