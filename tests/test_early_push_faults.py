"""The early push (uploads/services/early_push.py) under real faults: gunicorn, Celery workers,
beat and the IMS simulator as processes of their own (tests/fault_stack.py). A worker killed
during an early push, or the web server killed under the browser's PATCH, still ends with the
upload ready once and exactly one image in IMS."""

import signal
import subprocess

import pytest

from tests.conftest import make_image, wait_for
from tests.fault_stack import fault_stack, faults_stack  # noqa: F401  (fixtures)
from tests.test_faults import (  # noqa: F401  (the stack fixture)
    DONE, MiB, assert_ready_in_ims, explain, ims_requests, stack, start_patch, timeline, upload_of, uploader,
    wait_status,
)
from uploads.models import Status

pytestmark = [pytest.mark.faults, pytest.mark.slow]


def qcow2(tmp_path, megabytes: int = 24):
    raw = make_image(tmp_path / "source.raw", megabytes * MiB)
    path = tmp_path / "early.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True)
    return path


def wait_sending_early(stack, upload):
    def sending():
        upload.refresh_from_db()
        return upload.status == Status.SENDING_EARLY and upload.sent_bytes > 0

    try:
        wait_for(sending, timeout=30, interval=0.05, what=f"upload {upload.pk} to be sent early")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{explain(stack, upload)}") from None


def test_a_worker_killed_during_an_early_push_is_taken_over_and_the_upload_ends_ready_once(stack, client, tmp_path):
    path = qcow2(tmp_path)
    tus = uploader(stack, client, path, chunk_size=2 * MiB)
    for _ in range(4):  # 8 MiB of the browser's file: the early push starts, then waits for more
        tus.upload_chunk()
    upload = upload_of(tus)
    wait_sending_early(stack, upload)
    first_image = upload.ims_image_id

    stack.workers["w1"].kill(signal.SIGKILL)
    stack.workers["w1"].start().wait_ready()  # beat finds the early push whose heartbeat stopped
    wait_status(stack, upload, Status.RECEIVING, timeout=60)
    assert any("sending this upload early stopped" in line for line in timeline(upload))
    assert stack.sim.images() == []  # the cut PUT's image was deleted

    tus.upload()  # the browser sends the rest
    wait_status(stack, upload, *DONE, timeout=90)
    assert_ready_in_ims(stack, [(upload, path)])
    assert upload.ims_image_id != first_image
    assert ims_requests(stack, "POST").count(201) == 2 and ims_requests(stack, "DELETE") == [204]


def test_the_web_server_killed_under_an_early_pushs_patch_the_upload_resumes_and_ends_ready_once(
    stack, client, tmp_path
):
    path = qcow2(tmp_path)
    data = path.read_bytes()
    first = uploader(stack, client, path, chunk_size=4 * MiB)
    first.upload_chunk()
    upload = upload_of(first)
    wait_sending_early(stack, upload)

    patch = start_patch(stack, client, first.url, offset=4 * MiB, length=8 * MiB)
    patch.send(data[4 * MiB:8 * MiB])  # half of this PATCH, then the web server dies
    staged = stack.staged_path(upload)
    wait_for(lambda: staged.stat().st_size >= 8 * MiB, timeout=10, what="the web server to store part of the PATCH")
    stack.web.kill(signal.SIGKILL)
    patch.close()
    stack.web.start().wait_ready()

    again = uploader(stack, client, path, url=first.url, chunk_size=4 * MiB)
    again.upload()
    wait_status(stack, upload, *DONE, timeout=90)
    assert_ready_in_ims(stack, [(upload, path)])
    assert upload.attempt == 1  # the early push carried it through
    assert ims_requests(stack, "PUT") == [204]
