"""The upload page and the Cloud account page in a real browser (Debian's chromium through
Playwright, against the live portal and the IMS simulator): the details of every file of a
batch, a cancel on My uploads while the page is still sending, and the way back after
connecting the cloud account.

No Celery worker: the tasks the portal would send are caught (task_queue), as these tests
follow the browser's side only.
"""

import re
import shutil
import subprocess

import pytest
from playwright.sync_api import expect

from imssim.server import DEMO_DOMAIN, DEMO_PASSWORD, DEMO_PROJECT_NAME, DEMO_USER
from tests.conftest import connect_cloud, make_image, wait_for
from tests.test_browser import browser_page  # noqa: F401  (a fixture)
from uploads import services
from uploads.models import Status, Upload

pytestmark = [pytest.mark.browser, pytest.mark.slow]

MiB = 1024 * 1024


@pytest.fixture
def page(browser_page, live_server, transactional_db, alice, sim, task_queue):  # noqa: F811
    """A browser signed in as alice, who has not connected her cloud account yet."""
    browser_page.set_default_timeout(20_000)
    browser_page.goto(f"{live_server.url}/")
    browser_page.fill("#id_username", "alice")
    browser_page.fill("#id_password", "alice-pw-1234")
    browser_page.click("button[type=submit]")
    browser_page.wait_for_url(f"{live_server.url}/upload/")
    return browser_page


def qcow2(path):
    if not shutil.which("qemu-img"):
        pytest.fail("qemu-img is needed (Debian package qemu-utils); `make test` installs it")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
    return path


def add_files(page, *paths):
    page.locator(".uppy-Dashboard-input").first.set_input_files([str(p) for p in paths])
    # The editor of the first file opens by itself; back to the list.
    page.locator(".uppy-Dashboard-FileCard").get_by_text("Save details").click()


def expect_console_errors(page, *parts):
    """Take the errors a test provoked on purpose (the browser logs every 4xx reply, Uppy every
    error it passes on) out of those the browser_page fixture fails on."""
    page.console_errors[:] = [e for e in page.console_errors if not any(part in e for part in parts)]


def test_every_file_of_a_batch_shows_its_details_and_each_can_be_changed(page, live_server, alice, tmp_path):
    connect_cloud(alice)
    page.goto(f"{live_server.url}/upload/")
    add_files(page, make_image(tmp_path / "web-a.raw", 64 * 1024), qcow2(tmp_path / "db-b.qcow2"))

    rows = page.locator("#file-details tbody tr")
    expect(rows).to_have_count(2)
    web, db = rows.filter(has_text="web-a.raw"), rows.filter(has_text="db-b.qcow2")
    for row, name, disk_format in [(web, "web-a", "RAW"), (db, "db-b", "QCOW2")]:
        expect(row.locator(".file-table__name")).to_have_text(name)
        expect(row.locator("td").nth(0)).to_have_text(disk_format)
        expect(row.locator("td").nth(1)).to_have_text("Not set")  # the OS version

    page.get_by_label("OS version", exact=True).fill("Debian GNU/Linux 12 64bit")
    min_ram = page.get_by_label("Min RAM (MB)", exact=True)
    min_ram.fill("99999999")  # over the limit the server sets: nothing is applied
    page.get_by_role("button", name="Apply to all files").click()
    expect(page.locator("#apply-all-status")).to_contain_text("Min RAM: ")
    expect(min_ram).to_have_attribute("aria-invalid", "true")
    expect(web.locator("td").nth(1)).to_have_text("Not set")
    min_ram.fill("2048")
    page.get_by_role("button", name="Apply to all files").click()
    expect(page.locator("#apply-all-status")).to_have_text("OS version, Min RAM: set for each file in the list (2).")
    for row in (web, db):
        expect(row.locator("td").nth(1)).to_have_text("Debian GNU/Linux 12 64bit")
        expect(row.locator("td").nth(3)).to_have_text("2048")

    db.get_by_role("button", name="Edit the details of db-b.qcow2").click()
    card = page.locator(".uppy-Dashboard-FileCard")
    expect(card).to_contain_text("db-b.qcow2")
    card.locator("#uppy-Dashboard-FileCard-input-image_name").fill("database-2024")
    card.get_by_text("Save details").click()
    expect(db.locator(".file-table__name")).to_have_text("database-2024")
    expect(db.get_by_role("button", name="Edit the details of db-b.qcow2")).to_be_focused()  # back where it was

    page.click(".uppy-StatusBar-actionBtn--upload")
    expect(page.locator("#upload-done .done-list li")).to_have_count(2)
    sent = {u.filename: (u.name, u.disk_format, u.os_version, u.min_ram) for u in Upload.objects.all()}
    assert sent == {
        "web-a.raw": ("web-a", "raw", "Debian GNU/Linux 12 64bit", 2048),
        "db-b.qcow2": ("database-2024", "qcow2", "Debian GNU/Linux 12 64bit", 2048),
    }


def throttle(page, bytes_per_second: int):
    """Slow the page's sending down (-1: full speed again), so that a test acts while bytes are
    still on the way."""
    if not hasattr(page, "network"):
        page.network = page.context.new_cdp_session(page)
        page.network.send("Network.enable")
    page.network.send("Network.emulateNetworkConditions",
                      {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": bytes_per_second})


def count_creations(page) -> list:
    creations = []
    page.on("request", lambda r: creations.append(r.url) if r.method == "POST" and "/tus/" in r.url else None)
    return creations


def start_slow_upload(page, live_server, path) -> Upload:
    page.goto(f"{live_server.url}/upload/")
    throttle(page, 2 * MiB)
    add_files(page, path)
    page.click(".uppy-StatusBar-actionBtn--upload")
    upload = wait_for(Upload.objects.first, what="the upload to be created")
    # Bytes on their way: the status bar's progress has moved.
    expect(page.locator(".uppy-StatusBar-progress")).to_have_attribute("style", re.compile(r"width: *[1-9]"))
    return upload


def cancel_on_my_uploads(page, live_server, upload) -> str:
    """What the Cancel button on My uploads sends, from the same browser (its cookies).
    Returns what the upload page is to say."""
    token = next(c["value"] for c in page.context.cookies() if c["name"] == "csrftoken")
    response = page.request.post(f"{live_server.url}/uploads/{upload.uid}/cancel",
                                 form={"csrfmiddlewaretoken": token}, max_redirects=0)
    assert response.status == 302
    upload.refresh_from_db()
    assert upload.status == Status.CANCELLED and upload.received_bytes < upload.size
    return "Cancelled on My uploads"


def expire(page, live_server, upload) -> str:
    """What the portal does to an upload left unfinished too long."""
    services.upload_expire(upload=upload)
    upload.refresh_from_db()
    return f"The portal stopped this upload: {upload.error_message}"


def remove(page, live_server, upload) -> str:
    """An administrator deletes the upload."""
    upload.delete()
    return "This upload is no longer in the portal."


@pytest.mark.parametrize(("size_mib", "end"), [
    (60, cancel_on_my_uploads),  # more chunks to send: PATCH 409, HEAD 410
    (20, cancel_on_my_uploads),  # the last chunk in flight: a success reply
    (60, expire),  # PATCH 409, HEAD 410
    (60, remove),  # PATCH 404
], ids=["cancel-more-chunks-to-send", "cancel-last-chunk-in-flight", "expired", "removed"])
def test_an_upload_ended_while_sending_stops_with_why_and_nothing_starts_again(
        page, live_server, alice, tmp_path, size_mib, end):
    connect_cloud(alice)
    creations = count_creations(page)
    upload = start_slow_upload(page, live_server, make_image(tmp_path / "big-disk.raw", size_mib * MiB))

    says = end(page, live_server, upload)
    throttle(page, -1)  # the rest of the chunk on its way goes at full speed; the reply tells the page

    # In a role=alert region: read out when it appears.
    expect(page.locator("#upload-problems[role=alert]")).to_contain_text(f"big-disk.raw: {says}", timeout=30_000)
    expect(page.locator(".uppy-Dashboard-Item.is-error")).to_have_count(1)
    expect(page.locator("#upload-done")).to_be_hidden()
    assert Upload.objects.exclude(pk=upload.pk).count() == 0
    assert len(creations) == 1, creations
    expect_console_errors(page, "404 (Not Found)", "409 (Conflict)", "410 (Gone)", "tus: ")


@pytest.mark.parametrize("replies", [
    {"PATCH": [409]},  # a wrong offset: tus asks where the upload stands and goes on from there
    {"PATCH": [423]},  # another request was writing
    {"PATCH": [409], "HEAD": [503]},  # the portal was down for a moment
    {"PATCH": [409], "HEAD": [423]},
], ids=["patch-409", "patch-423", "head-503", "head-423"])
def test_a_passing_refusal_is_tried_again_on_the_same_upload(page, live_server, alice, tmp_path, replies):
    connect_cloud(alice)
    creations = count_creations(page)

    def reply_once(route):
        planned = replies.get(route.request.method)
        if planned:
            route.fulfill(status=planned.pop(0), headers={"Tus-Resumable": "1.0.0"}, body="")
        else:
            route.continue_()

    page.route(re.compile(r"/tus/[0-9a-f-]{36}$"), reply_once)
    page.goto(f"{live_server.url}/upload/")
    add_files(page, make_image(tmp_path / "disk.raw", MiB))
    page.click(".uppy-StatusBar-actionBtn--upload")
    expect(page.locator("#upload-done .done-list li")).to_have_count(1)
    assert replies == {method: [] for method in replies}
    assert Upload.objects.get().received_bytes == MiB and len(creations) == 1
    expect(page.locator("#upload-problems")).to_be_hidden()
    expect_console_errors(page, "Failed to load resource", "tus: ")


def test_a_file_added_again_after_its_upload_was_cancelled_is_not_sent_again_by_itself(
        page, live_server, alice, tmp_path):
    connect_cloud(alice)
    image = make_image(tmp_path / "big-disk.raw", 60 * MiB)
    upload = start_slow_upload(page, live_server, image)
    page.once("dialog", lambda dialog: dialog.accept())  # "Leave the page?" while it sends: yes
    page.goto(f"{live_server.url}/uploads/")
    cancel_on_my_uploads(page, live_server, upload)

    creations = count_creations(page)
    throttle(page, -1)
    page.goto(f"{live_server.url}/upload/")
    add_files(page, image)
    page.click(".uppy-StatusBar-actionBtn--upload")  # tus finds the earlier upload and asks (HEAD 410)
    expect(page.locator("#upload-problems")).to_contain_text("big-disk.raw: Cancelled on My uploads")
    assert Upload.objects.count() == 1 and creations == []

    page.locator(".uppy-StatusBar").get_by_role("button", name="Retry").click()  # now knowingly
    expect(page.locator("#upload-done .done-list li")).to_have_count(1, timeout=30_000)
    assert list(Upload.objects.order_by("pk").values_list("status", flat=True)) == [Status.CANCELLED,
                                                                                     Status.RECEIVED]
    expect_console_errors(page, "410 (Gone)", "tus: ")


def test_connecting_from_the_upload_page_leads_back_to_it(page, live_server):
    page.goto(f"{live_server.url}/upload/")
    page.get_by_role("link", name="Connect cloud account").click()
    page.fill("#id_domain", DEMO_DOMAIN)
    page.fill("#id_user_name", DEMO_USER)
    page.fill("#id_password", DEMO_PASSWORD)
    page.fill("#id_project", DEMO_PROJECT_NAME)
    page.get_by_role("button", name="Connect", exact=True).click()
    page.wait_for_url(f"{live_server.url}/upload/")
    expect(page.locator(".messages")).to_contain_text("Your cloud account is connected")
    expect(page.locator(".uppy-Dashboard")).to_be_visible()

    # A next that leads off the site is ignored: the person stays on the portal.
    page.goto(f"{live_server.url}/cloud/?next=https://evil.example/")
    page.get_by_text("Use another account or project").click()
    page.fill("#id_password", DEMO_PASSWORD)
    page.get_by_role("button", name="Connect", exact=True).click()
    page.wait_for_url(f"{live_server.url}/cloud/")
    page.get_by_role("link", name="Continue to Upload").click()
    page.wait_for_url(f"{live_server.url}/upload/")
