"""What a person clicks, in a real browser: Debian's chromium driven by Playwright, against the
live portal, a real Celery worker and Redis, and the IMS simulator.

screenshot() keeps a picture in the test's temporary folder; with UPDATE_SCREENSHOTS=1 it also
copies it to docs/screenshots/. `make screenshots` sets that for tests/test_browser_pages.py only,
which takes the README's pictures of every page from realistic uploads (tests/scene.py).
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from imssim.server import DEMO_DOMAIN, DEMO_PASSWORD, DEMO_PROJECT_NAME, DEMO_USER
from uploads.models import Status, Upload

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"


@pytest.fixture
def browser_page(monkeypatch):
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is needed at /usr/bin/chromium; `make test` installs it")
    # Playwright's sync API runs an event loop in this thread; the ORM calls the live server and
    # this test make are still plain synchronous code.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    from django.db import connections
    from playwright.sync_api import sync_playwright

    # Django keeps a connection per context, and the event loop brings a context of its own: a
    # connection opened on either side of it and left open would outlive the test and keep the
    # test database from being dropped at the end of the run. Close them on both sides.
    connections.close_all()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.console_errors = errors  # a test that provokes an error reply removes what it expects
        try:
            yield page
        finally:
            connections.close_all()
        browser.close()
    connections.close_all()
    assert errors == [], errors


def screenshot(page, tmp_path, name: str, *, full_page: bool = True) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=full_page)
    if os.environ.get("UPDATE_SCREENSHOTS"):
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, SCREENSHOTS / name)
    return path


def qcow2_file(tmp_path) -> Path:
    if not shutil.which("qemu-img"):
        pytest.fail("qemu-img is needed (Debian package qemu-utils); `make test` installs it")
    path = tmp_path / "web-server-2024.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
    return path


def test_a_person_signs_in_connects_uploads_and_sees_it_ready(e2e, live_server, alice, sim, browser_page, tmp_path):
    page = browser_page
    page.set_default_timeout(30_000)

    page.goto(f"{live_server.url}/")
    page.fill("#id_username", "alice")
    page.fill("#id_password", "alice-pw-1234")
    page.click("button[type=submit]")

    page.goto(f"{live_server.url}/cloud/")
    page.fill("#id_domain", DEMO_DOMAIN)
    page.fill("#id_user_name", DEMO_USER)
    page.fill("#id_password", DEMO_PASSWORD)
    page.fill("#id_project", DEMO_PROJECT_NAME)
    page.locator("#id_project").press("Enter")
    page.wait_for_selector("text=Your cloud account is connected")

    page.goto(f"{live_server.url}/upload/")
    image = qcow2_file(tmp_path)
    page.locator(".uppy-Dashboard-input").first.set_input_files(str(image))
    # The details of the first file open by themselves, filled in from the file name.
    card = page.locator(".uppy-Dashboard-FileCard")
    card.wait_for()
    assert card.locator("input[name=image_name], #uppy-Dashboard-FileCard-input-image_name").first.input_value() == (
        "web-server-2024")
    screenshot(page, tmp_path, "upload.png")
    card.get_by_text("Save details").click()
    page.click(".uppy-StatusBar-actionBtn--upload")
    page.wait_for_selector("#upload-done", state="visible")

    upload = Upload.objects.get()
    assert (upload.name, upload.disk_format, upload.filename) == ("web-server-2024", "qcow2", image.name)

    page.click("text=See progress on My uploads")
    row = page.locator("li.upload", has_text=image.name)
    row.get_by_text("Ready", exact=True).wait_for(timeout=60_000)  # updated live, no reload
    upload.refresh_from_db()
    assert upload.status == Status.READY
    assert upload.ims_image_id in row.inner_text()
    screenshot(page, tmp_path, "my-uploads.png")
    [stored] = sim.images()
    assert stored["checksum"] == upload.md5 and stored["size"] == image.stat().st_size
