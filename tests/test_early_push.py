"""Pushing while the browser is still uploading (uploads/services/early_push.py), against the IMS
simulator over HTTP.

This process plays the browser (tus chunks through services.upload_receive) and runs the early
push in a thread of its own, as a worker would; the simulator holds the incomplete PUT open the
way Glance does. Each test ends with one active image holding exactly the file, or with none.
"""

import hashlib
import io
import os
import subprocess
import threading
from pathlib import Path

import pytest
from django.db import connection

from tests.conftest import connect_cloud, wait_for
from uploads import services
from uploads.models import Status, Upload
from uploads.services import early_push

MiB = 1024 * 1024
pytestmark = [pytest.mark.slow]


def qcow2_file(tmp_path: Path, megabytes: int, name: str = "disk.qcow2") -> Path:
    """A QCOW2 file holding `megabytes` of random data (so it is as big as its disk)."""
    raw = tmp_path / f"{name}.raw"
    with open(raw, "wb") as out:
        out.write(bytes(512))
        out.write(os.urandom(megabytes * MiB - 512))
    path = tmp_path / name
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True)
    raw.unlink()
    return path


class Browser:
    """Sends a file's bytes as tus chunks would, up to any offset, when the test says so."""

    def __init__(self, owner, path: Path, disk_format: str):
        self.path = path
        self.data = path.read_bytes()
        self.upload = services.upload_create(owner=owner, size=len(self.data), filename=path.name,
                                             name=f"early {path.name}", disk_format=disk_format)

    def send_to(self, end: int, chunk: int = MiB) -> None:
        upload = Upload.objects.get(pk=self.upload.pk)
        offset = upload.received_bytes
        while offset < end:
            length = min(chunk, end - offset)
            offset = services.upload_receive(upload=upload, offset=offset, length=length,
                                             stream=io.BytesIO(self.data[offset:offset + length]))

    def send_all(self) -> None:
        self.send_to(len(self.data))


class Worker(threading.Thread):
    """The early push, run as a worker runs it."""

    def __init__(self, upload_id: int):
        super().__init__(daemon=True)
        self.upload_id = upload_id
        self.error = None

    def run(self):
        try:
            services.upload_push_early(upload_id=self.upload_id)
        except BaseException as exc:  # the test says so instead of a silent thread
            self.error = exc
        finally:
            connection.close()

    def finish(self, timeout: float = 60) -> None:
        self.join(timeout)
        assert not self.is_alive(), "the early push did not end"
        assert self.error is None, repr(self.error)


class Caught(list):
    """The tasks the portal queued, as ("push" | "early" | "discard", upload id); and the images
    whose PUT the simulator received whole (`finished_puts`: the ones it made active)."""

    finished_puts: list


@pytest.fixture
def portal(transactional_db, sim, alice, settings, monkeypatch):
    """Alice connected to the simulator; what the portal queues is caught, not sent."""
    connect_cloud(alice)
    settings.EARLY_PUSH_STALL_SECONDS = 30
    caught = Caught()
    for kind, name in (("push", "enqueue_push"), ("early", "enqueue_early_push"), ("discard", "enqueue_discard")):
        monkeypatch.setattr(services.dispatch, name, lambda upload_id, kind=kind: caught.append((kind, upload_id)))
    caught.finished_puts = []
    real_finish = sim.finish_upload

    def finish_upload(image_id, *args):
        caught.finished_puts.append(image_id)
        return real_finish(image_id, *args)

    monkeypatch.setattr(sim, "finish_upload", finish_upload)
    return caught


def bytes_at_ims(sim, upload: Upload) -> int:
    """How much of the PUT's body the simulator has taken so far."""
    upload.refresh_from_db()
    path = sim.image_path(upload.ims_image_id) if upload.ims_image_id else None
    return path.stat().st_size if path and path.exists() else 0


def start_early_push(portal, browser: Browser) -> Worker:
    browser.send_to(2 * MiB)
    assert ("early", browser.upload.pk) in portal
    worker = Worker(browser.upload.pk)
    worker.start()
    return worker


def timeline(upload: Upload) -> str:
    return "\n".join(event.message for event in upload.events.all())


def test_a_qcow2_is_sent_while_it_arrives_its_end_held_back_and_ends_ready(portal, sim, alice, tmp_path):
    path = qcow2_file(tmp_path, 24)
    browser = Browser(alice, path, "qcow2")
    size = len(browser.data)
    worker = start_early_push(portal, browser)
    browser.send_to(size // 2)
    wait_for(lambda: bytes_at_ims(sim, browser.upload) >= size // 2 - MiB, what="IMS to have half the file")
    upload = Upload.objects.get(pk=browser.upload.pk)
    assert upload.status == Status.SENDING_EARLY
    [image] = sim.images()
    assert image["status"] == "saving"  # the PUT is open, its body incomplete

    # All but the last few bytes: IMS gets everything but the held-back end, and waits.
    browser.send_to(size - 10)
    wait_for(lambda: bytes_at_ims(sim, browser.upload) == size - early_push.HOLD_BACK_BYTES,
             what="IMS to have all but the held-back end")
    assert sim.images()[0]["status"] == "saving" and portal.finished_puts == []

    browser.send_all()
    worker.finish()
    upload.refresh_from_db()
    assert upload.status == Status.READY, timeline(upload)
    [image] = sim.images()
    assert image["id"] == upload.ims_image_id and image["status"] == "active"
    assert image["checksum"] == upload.md5 == hashlib.md5(browser.data).hexdigest()
    assert image["os_hash_value"] == upload.sha512 == hashlib.sha512(browser.data).hexdigest()
    assert image["size"] == size and upload.send_format == "qcow2"
    assert ("push", upload.pk) not in portal  # no second, usual push
    assert [r["method"] for r in sim.requests_seen() if r["path"].startswith("/v2/images")].count("POST") == 1
    assert "qemu_img_check" in upload.inspection["checks"]  # the whole file was checked before its end went
    # The ingest did not hash the bytes the early push hashed as it sent them: no sums, no seal.
    assert "seal" not in upload.received_sums and "md5" not in upload.received_sums


def test_a_qcow2_whose_tail_is_cut_is_refused_and_its_image_never_becomes_active(portal, sim, alice, tmp_path):
    whole = qcow2_file(tmp_path, 24, "whole.qcow2").read_bytes()
    path = tmp_path / "cut.qcow2"
    path.write_bytes(whole[: len(whole) - 2 * MiB])  # the header is fine; clusters past the end are missing
    browser = Browser(alice, path, "qcow2")
    worker = start_early_push(portal, browser)
    browser.send_to(len(browser.data) // 2)
    wait_for(lambda: bytes_at_ims(sim, browser.upload) > MiB, what="the early push to send bytes")
    browser.send_all()
    worker.finish()

    upload = Upload.objects.get(pk=browser.upload.pk)
    assert upload.status == Status.REFUSED, timeline(upload)
    assert upload.error_code == "truncated" and "incomplete" in upload.error_message
    assert portal.finished_puts == []  # IMS never had a whole body
    assert sim.images() == [] and upload.ims_image_id == ""
    puts = [r["status"] for r in sim.requests_seen() if r["method"] == "PUT"]
    # Cut before its end: IMS never took it (no answer, or 410 when the DELETE of the image
    # reached the simulator before it noticed the cut body).
    assert len(puts) == 1 and puts[0] in (None, 410)


def test_a_qcow2_with_a_backing_file_is_never_pushed_early_and_is_refused(portal, sim, alice, tmp_path):
    base = qcow2_file(tmp_path, 4, "base.qcow2")
    path = tmp_path / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(path)], check=True)
    with open(path, "ab") as out:  # big enough to be pushed early
        out.write(bytes(20 * MiB))
    browser = Browser(alice, path, "qcow2")
    worker = start_early_push(portal, browser)
    worker.finish()  # its header is checked before any image is made: given up at once
    upload = Upload.objects.get(pk=browser.upload.pk)
    assert upload.status == Status.RECEIVING and "Stopped sending early" in timeline(upload)
    assert sim.requests_seen() == [] or all(r["method"] != "POST" or "/v2/images" not in r["path"]
                                            for r in sim.requests_seen())
    browser.send_all()
    assert ("push", upload.pk) in portal
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.REFUSED and upload.error_code == "backing_file"
    assert sim.images() == []


def test_a_browser_that_stalls_longer_than_the_setting_falls_back_to_the_usual_push(
    portal, sim, alice, tmp_path, settings
):
    settings.EARLY_PUSH_STALL_SECONDS = 1
    browser = Browser(alice, qcow2_file(tmp_path, 24), "qcow2")
    worker = start_early_push(portal, browser)
    browser.send_to(len(browser.data) // 2)
    wait_for(lambda: bytes_at_ims(sim, browser.upload) > MiB, what="the early push to send bytes")
    worker.finish()  # the browser sends nothing more: given up after a second
    upload = Upload.objects.get(pk=browser.upload.pk)
    assert upload.status == Status.RECEIVING, timeline(upload)
    assert "the browser sent nothing for 1 seconds" in timeline(upload)
    assert sim.images() == [] and upload.ims_image_id == "" and portal.finished_puts == []

    browser.send_all()
    assert ("push", upload.pk) in portal and portal.count(("early", upload.pk)) == 1  # not tried again
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.READY, timeline(upload)
    [image] = sim.images()
    assert image["id"] == upload.ims_image_id and image["checksum"] == hashlib.md5(browser.data).hexdigest()
    assert upload.attempt == 2 and upload.requeued_at_attempt == 1  # the usual push has all its attempts


def test_cancel_during_an_early_push_cuts_the_put_and_deletes_the_image(portal, sim, alice, tmp_path):
    browser = Browser(alice, qcow2_file(tmp_path, 24), "qcow2")
    worker = start_early_push(portal, browser)
    browser.send_to(len(browser.data) // 2)
    wait_for(lambda: bytes_at_ims(sim, browser.upload) > MiB, what="the early push to send bytes")
    upload = Upload.objects.get(pk=browser.upload.pk)
    services.upload_cancel(upload=upload, by="alice")
    worker.finish()
    assert ("discard", upload.pk) in portal
    services.upload_discard(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.CANCELLED
    assert sim.images() == [] and portal.finished_puts == []
    with pytest.raises(services.UploadStopped):
        browser.send_all()


def test_an_expired_upload_stops_its_early_push_and_leaves_no_image(portal, sim, alice, tmp_path):
    from django.utils import timezone

    browser = Browser(alice, qcow2_file(tmp_path, 24), "qcow2")
    worker = start_early_push(portal, browser)
    wait_for(lambda: bytes_at_ims(sim, browser.upload) > 0, what="the early push to send bytes")
    Upload.objects.filter(pk=browser.upload.pk).update(receive_expires_at=timezone.now())
    services.staging_cleanup()
    worker.finish()
    upload = Upload.objects.get(pk=browser.upload.pk)
    assert upload.status == Status.FAILED and upload.error_code == "expired"
    assert sim.images() == [] and portal.finished_puts == []


def test_an_early_push_whose_worker_stopped_beating_is_taken_over_and_ends_with_one_image(
    portal, sim, alice, tmp_path
):
    """The reconciler takes over an early push whose heartbeat stopped; should its worker wake up
    after all, it finds the upload moved on and stops too. One image in the end."""
    from datetime import timedelta

    from django.utils import timezone

    browser = Browser(alice, qcow2_file(tmp_path, 24), "qcow2")
    worker = start_early_push(portal, browser)
    browser.send_to(len(browser.data) // 2)
    wait_for(lambda: bytes_at_ims(sim, browser.upload) > MiB, what="the early push to send bytes")
    Upload.objects.filter(pk=browser.upload.pk).update(heartbeat_at=timezone.now() - timedelta(hours=1))
    assert browser.upload.pk in services.uploads_to_reconcile()
    services.upload_push(upload_id=browser.upload.pk)  # what the reconciler's message does
    worker.finish()
    upload = Upload.objects.get(pk=browser.upload.pk)
    assert upload.status == Status.RECEIVING, timeline(upload)
    assert "The worker that was sending this upload early stopped" in timeline(upload)
    assert sim.images() == [] and portal.finished_puts == []

    browser.send_all()
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.READY, timeline(upload)
    assert [image["id"] for image in sim.images()] == [upload.ims_image_id]


def test_a_file_that_needs_conversion_or_a_review_is_not_pushed_early(portal, sim, alice, tmp_path, settings):
    vmdk = tmp_path / "disk.vmdk"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "vmdk", str(qcow2_file(tmp_path, 20)), str(vmdk)],
                   check=True)
    Browser(alice, vmdk, "vmdk").send_to(2 * MiB)
    settings.UPLOAD_REVIEW_REQUIRED = True
    Browser(alice, qcow2_file(tmp_path, 20, "reviewed.qcow2"), "qcow2").send_to(2 * MiB)
    assert [kind for kind, _ in portal if kind == "early"] == []


def test_the_status_json_shows_both_hops_while_sending_early(portal, sim, alice, tmp_path, client):
    browser = Browser(alice, qcow2_file(tmp_path, 24), "qcow2")
    worker = start_early_push(portal, browser)
    browser.send_to(len(browser.data) // 2)
    wait_for(lambda: Upload.objects.get(pk=browser.upload.pk).sent_bytes > MiB, what="sent bytes recorded")
    client.force_login(alice)
    status = client.get(f"/uploads/{browser.upload.uid}/status").json()
    assert status["status"] == "sending_early" and status["waiting_on"] == "browser"
    assert status["receive_percent"] >= 45 and 0 < status["send_percent"] <= status["receive_percent"]
    assert "sent to IMS" in status["detail"]
    page = client.get(f"/uploads/{browser.upload.uid}/").content.decode()
    assert 'data-live="send-bar"' in page
    upload_page = client.get("/upload/").content.decode()  # its script shows the same for each file
    assert 'id="ims-hop"' in upload_page and "% sent on to IMS" in upload_page
    browser.send_all()
    worker.finish()
    assert Upload.objects.get(pk=browser.upload.pk).status == Status.READY


def test_the_simulator_holds_an_incomplete_put_open_and_never_activates_a_cut_body(sim, alice_connected):
    """As Glance does: what part of a body arrived is taken at once (the image stays saving), and a
    body cut before its Content-Length leaves the image queued and empty, never active."""
    import socket
    from urllib.parse import urlsplit

    client = services.cloud.ims_client(services.cloud.owner_token(alice_connected.pk).value)
    image = client.create_image(name="held", disk_format="raw", min_disk=1)
    url = urlsplit(sim.url)
    with socket.create_connection((url.hostname, url.port)) as conn:
        conn.sendall((f"PUT /v2/images/{image.id}/file HTTP/1.1\r\nHost: {url.netloc}\r\n"
                      f"X-Auth-Token: {client.session.headers['X-Auth-Token']}\r\n"
                      f"Content-Type: application/octet-stream\r\nContent-Length: {4 * MiB}\r\n\r\n").encode())
        conn.sendall(b"x" * (3 * MiB + 5))
        wait_for(lambda: sim.image_path(image.id).exists() and sim.image_path(image.id).stat().st_size == 3 * MiB + 5,
                 what="the simulator to take every byte that arrived")
        assert client.get_image(image.id).status == "saving"
    wait_for(lambda: client.get_image(image.id).status != "saving", what="the cut PUT to end")
    stored = client.get_image(image.id)
    assert stored.status == "queued" and not stored.checksum and not stored.size
    assert not sim.image_path(image.id).exists()


@pytest.mark.parametrize(("disk_format", "qemu_format"), [("raw", None), ("vhd", "vpc")])
def test_raw_and_dynamic_vhd_files_are_sent_early_too(portal, sim, alice, tmp_path, disk_format, qemu_format):
    path = qcow2_file(tmp_path, 20)
    if disk_format == "raw":
        target = tmp_path / "disk.raw"
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(path), str(target)], check=True)
    else:  # a dynamic VHD: its header says so at the start (a fixed one is converted, never sent early)
        target = tmp_path / "disk.vhd"
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", qemu_format, str(path), str(target)], check=True)
    browser = Browser(alice, target, disk_format)
    worker = start_early_push(portal, browser)
    browser.send_to(len(browser.data) // 2)
    wait_for(lambda: bytes_at_ims(sim, browser.upload) > MiB, what="the early push to send bytes")
    browser.send_all()
    worker.finish()
    upload = Upload.objects.get(pk=browser.upload.pk)
    assert upload.status == Status.READY, timeline(upload)
    assert upload.send_format == disk_format and ("push", upload.pk) not in portal
    [image] = sim.images()
    assert image["checksum"] == hashlib.md5(browser.data).hexdigest()
