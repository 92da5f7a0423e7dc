"""The live status in a real browser: a refused file reads "Refused" with its one next step, and
an upload's own page fills in every detail that changes (image id, timeline) without a reload.

The worker's part runs in this test's thread (services.upload_push against the simulator); the
tasks the services would queue are caught (task_queue), so no other module's worker sees them.
"""

import os

import pytest

from tests.conftest import connect_cloud
from tests.test_browser import browser_page, screenshot  # noqa: F401  (browser_page: a fixture)
from tests.test_pipeline import received_upload
from uploads import services
from uploads.models import Status, Upload

pytestmark = [pytest.mark.browser, pytest.mark.slow]

RANDOM = bytes(512) + os.urandom(200_000)  # no disk image format at all


def sign_in(page, live_server):
    page.goto(f"{live_server.url}/accounts/login/")
    page.fill("#id_username", "alice")
    page.fill("#id_password", "alice-pw-1234")
    page.click("button[type=submit]")
    page.wait_for_url(lambda url: "/accounts/login/" not in url)


@pytest.fixture
def alice_signed_in(live_server, alice, sim, task_queue, browser_page):  # noqa: F811
    connect_cloud(alice)
    browser_page.set_default_timeout(20_000)
    sign_in(browser_page, live_server)
    return browser_page


def test_a_refused_file_turns_refused_live_with_upload_it_as_raw_first(live_server, alice, alice_signed_in, sim,
                                                                       tmp_path):
    page = alice_signed_in
    upload = received_upload(alice, RANDOM, disk_format="qcow2", name="random")
    page.goto(f"{live_server.url}/uploads/")
    card = page.locator("li.upload", has_text="random.qcow2")
    card.get_by_text("Received", exact=True).wait_for()

    services.upload_push(upload_id=upload.pk)  # the worker's check refuses it
    card.locator('[data-live="badge"]', has_text="Refused").wait_for()  # live, no reload
    assert card.locator('[data-live="detail"]').inner_text() == "Not sent to IMS: the file did not pass the check"
    use_raw = card.locator('[data-live="use_format-button"]')
    assert use_raw.is_visible() and use_raw.inner_text() == "Upload it as RAW"
    assert "button--primary" in use_raw.get_attribute("class")
    assert not card.locator('[data-live="retry"]').is_visible()
    remove = card.locator('[data-live="stop-button"]')
    assert remove.inner_text() == "Remove" and "button--primary" not in remove.get_attribute("class")
    screenshot(page, tmp_path, "refused.png")

    questions = []
    page.once("dialog", lambda dialog: (questions.append(dialog.message), dialog.dismiss()))
    remove.click()
    page.wait_for_timeout(200)  # the dismissed question sends nothing
    assert questions == ["Remove “random”? The portal deletes its copy of the file. This cannot be undone."]
    assert Upload.objects.get(pk=upload.pk).status == Status.REFUSED

    use_raw.click()
    page.wait_for_selector("text=will be sent as RAW")
    upload.refresh_from_db()
    assert (upload.status, upload.disk_format) == (Status.RECEIVED, "raw")
    services.upload_push(upload_id=upload.pk)
    card = page.locator("li.upload", has_text="random.qcow2")
    card.locator('[data-live="badge"]', has_text="Ready").wait_for()
    upload.refresh_from_db()
    assert upload.ims_image_id in card.inner_text()
    assert not card.locator('[data-live="use_format"]').is_visible()


def test_the_detail_page_fills_in_the_image_id_and_timeline_when_ready(live_server, alice, alice_signed_in, sim,
                                                                       tmp_path):
    page = alice_signed_in
    upload = received_upload(alice, RANDOM, disk_format="raw", name="web")
    page.goto(f"{live_server.url}/uploads/{upload.uid}/")
    details = page.locator('[data-live-section="details"]')
    assert "Not created yet" in details.inner_text()
    page.evaluate("window.notReloaded = true")

    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.READY
    page.locator('[data-live-section="details"]', has_text=upload.ims_image_id).wait_for()
    timeline = page.locator('[data-live-section="timeline"]').inner_text()
    assert f"Image {upload.ims_image_id} is active in IMS" in timeline
    assert page.evaluate("window.notReloaded") is True
    assert not page.locator('[data-live="page-stale"]').is_visible()
    assert "Not created yet" not in page.locator('[data-live-section="details"]').inner_text()
    screenshot(page, tmp_path, "detail-ready.png")
