"""End to end with real parts: tuspy → /tus/ (live server) → staging → a real Celery worker over
real Redis → the IMS simulator over HTTP → poll until ready."""

import hashlib

import pytest
from tusclient.client import TusClient

from tests.conftest import connect_cloud, make_image, tus_headers, wait_for
from uploads.models import Status, Upload

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def tus_upload(live_server, client, path, **metadata) -> Upload:
    tus = TusClient(f"{live_server.url}/tus/", headers=tus_headers(client))
    uploader = tus.uploader(str(path), chunk_size=1024 * 1024, metadata={"filename": path.name, **metadata})
    uploader.upload()
    return Upload.objects.get(uid=uploader.url.rstrip("/").rsplit("/", 1)[-1])


def wait_until_finished(upload: Upload, timeout: float = 60) -> Upload:
    def finished():
        upload.refresh_from_db()
        return upload.status in {Status.READY, Status.FAILED, Status.REFUSED, Status.RECONNECT, Status.CANCELLED}

    wait_for(finished, timeout=timeout, interval=0.2, what=f"upload {upload.uid} to finish")
    return upload


def test_a_tus_upload_ends_ready_and_ims_holds_the_same_bytes(e2e, live_server, client, alice, sim, tmp_path):
    connect_cloud(alice)
    client.force_login(alice)
    path = make_image(tmp_path / "disk.raw", 3 * 1024 * 1024 + 123)
    upload = tus_upload(live_server, client, path, image_name="e2e disk", os_version="Debian GNU/Linux 12 64bit")
    assert upload.received_bytes == path.stat().st_size
    upload = wait_until_finished(upload)
    assert upload.status == Status.READY, (upload.error_message, e2e.output()[-3000:])
    [image] = sim.images()
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    assert image["id"] == upload.ims_image_id
    assert image["checksum"] == md5 == upload.md5
    assert image["size"] == path.stat().st_size
    status = client.get(f"/uploads/{upload.uid}/status").json()
    assert (status["status"], status["ims_image_id"], status["finished"]) == ("ready", image["id"], True)


def test_an_ims_500_on_the_first_put_is_retried_by_the_worker(e2e, live_server, client, alice, sim, tmp_path):
    connect_cloud(alice)
    client.force_login(alice)
    sim.set_faults(fail_puts=1)
    path = make_image(tmp_path / "retry.raw", 512 * 1024)
    upload = wait_until_finished(tus_upload(live_server, client, path), timeout=90)
    assert upload.status == Status.READY, (upload.error_message, e2e.output()[-3000:])
    assert upload.attempt == 2
    assert [r["status"] for r in sim.requests_seen() if r["method"] == "PUT"] == [500, 204]
    assert len(sim.images()) == 1


def test_an_expired_sign_in_waits_for_reconnect_then_continues(e2e, live_server, client, alice, sim, tmp_path):
    connect_cloud(alice)
    client.force_login(alice)
    sim.set_faults(expire_tokens=True)
    path = make_image(tmp_path / "later.raw", 256 * 1024)
    upload = wait_until_finished(tus_upload(live_server, client, path))
    assert upload.status == Status.RECONNECT
    page = client.get("/uploads/").content.decode()
    assert "Your cloud sign-in has expired" in page
    response = client.post("/cloud/", {"domain": "demo-domain", "user_name": "demo",
                                       "password": "demo-cloud-pw", "project": "eu-de"})
    assert response.status_code == 302
    upload = wait_until_finished(upload)
    wait_for(lambda: (upload.refresh_from_db(), upload.status == Status.READY)[1], timeout=60, what="ready")
    assert len(sim.images()) == 1


def test_an_interrupted_upload_resumes_from_the_servers_offset(e2e, live_server, client, alice, sim, tmp_path):
    connect_cloud(alice)
    client.force_login(alice)
    path = make_image(tmp_path / "resume.raw", 3 * 1024 * 1024)
    tus = TusClient(f"{live_server.url}/tus/", headers=tus_headers(client))
    first = tus.uploader(str(path), chunk_size=1024 * 1024, metadata={"filename": path.name})
    first.upload_chunk()  # then the tab closes
    upload = Upload.objects.get(uid=first.url.rsplit("/", 1)[-1])
    assert upload.received_bytes == 1024 * 1024 and upload.status == Status.RECEIVING
    # The same file chosen again, in a new client that knows only the upload's address.
    again = TusClient(f"{live_server.url}/tus/", headers=tus_headers(client)).uploader(
        str(path), chunk_size=1024 * 1024, url=first.url
    )
    assert again.get_offset() == 1024 * 1024
    again.upload()
    upload = wait_until_finished(upload)
    assert upload.status == Status.READY
    [image] = sim.images()
    assert image["checksum"] == hashlib.md5(path.read_bytes()).hexdigest()
    assert Upload.objects.count() == 1
