"""The upload page in a real browser while a file is sent on to IMS as it arrives (early push):
the page shows the second hop's progress beside Uppy's, and the upload ends ready."""

import pytest
from playwright.sync_api import expect

from tests.conftest import connect_cloud, wait_for
from tests.test_browser import browser_page  # noqa: F401  (a fixture)
from tests.test_browser_upload import add_files, page, throttle  # noqa: F401  (page: a fixture)
from tests.test_early_push import MiB, Worker, qcow2_file
from uploads.models import Status, Upload

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_the_upload_page_shows_the_file_going_on_to_ims_while_it_is_still_sent(
    page, live_server, alice, sim, task_queue, tmp_path  # noqa: F811
):
    connect_cloud(alice)
    path = qcow2_file(tmp_path, 24, "early.qcow2")
    page.goto(f"{live_server.url}/upload/")
    throttle(page, 3 * MiB)
    add_files(page, path)
    page.click(".uppy-StatusBar-actionBtn--upload")
    upload = wait_for(Upload.objects.first, what="the upload to be created")
    wait_for(lambda: ("early", upload.pk) in task_queue, what="the early push to be queued")
    worker = Worker(upload.pk)  # as a Celery worker would run it
    worker.start()

    hop = page.locator("#ims-hop")
    expect(hop).to_be_visible()
    expect(hop).to_contain_text("early")  # the file's image name
    expect(hop.locator("li")).to_contain_text("% sent on to IMS")
    wait_for(lambda: page.locator("#ims-hop progress").evaluate("bar => bar.value") > 0, timeout=30,
             what="the second bar to move")
    upload.refresh_from_db()
    assert upload.status == Status.SENDING_EARLY and upload.received_bytes < upload.size

    expect(page.locator("#upload-done")).to_be_visible(timeout=60_000)
    worker.finish()
    upload.refresh_from_db()
    assert upload.status == Status.READY
    expect(hop.locator("li")).to_contain_text("Ready", timeout=10_000)
