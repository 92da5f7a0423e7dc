"""The upload page in German in a real browser (Debian's chromium): the header's switch, worked
with the keyboard, turns the portal German; the JavaScript's own words come from Django's
catalogue and Uppy's from its German pack, and the live status speaks German too."""

import pytest
from playwright.sync_api import expect

from tests.conftest import connect_cloud, make_image, wait_for
from tests.test_browser import browser_page, screenshot  # noqa: F401  (browser_page: a fixture)
from uploads.models import Upload

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture
def page(browser_page, live_server, transactional_db, alice, sim, task_queue):  # noqa: F811
    browser_page.set_default_timeout(20_000)
    browser_page.goto(f"{live_server.url}/")
    browser_page.fill("#id_username", "alice")
    browser_page.fill("#id_password", "alice-pw-1234")
    browser_page.click("button[type=submit]")
    browser_page.wait_for_url(f"{live_server.url}/upload/")
    return browser_page


def test_the_upload_page_in_german_through_the_switch(page, live_server, alice, tmp_path):
    connect_cloud(alice)
    page.goto(f"{live_server.url}/upload/")
    switch = page.get_by_role("form", name="Language")
    deutsch = switch.get_by_role("button", name="Deutsch")
    expect(deutsch).to_have_attribute("aria-pressed", "false")
    deutsch.focus()
    page.keyboard.press("Enter")  # the keyboard alone is enough
    page.wait_for_url(f"{live_server.url}/upload/")
    expect(page.locator("html")).to_have_attribute("lang", "de")
    expect(page.get_by_role("heading", level=1)).to_have_text("Disk-Images hochladen")
    expect(page.get_by_role("form", name="Sprache").get_by_role("button", name="Deutsch")).to_have_attribute(
        "aria-pressed", "true")

    dashboard = page.locator(".uppy-Dashboard")
    expect(dashboard).to_contain_text("Disk-Images hier ablegen oder Dateien auswählen")  # djangojs.po
    page.locator(".uppy-Dashboard-input").first.set_input_files([str(make_image(tmp_path / "web.raw", 64 * 1024))])
    card = page.locator(".uppy-Dashboard-FileCard")
    expect(card).to_contain_text("Image-Angaben von web.raw")  # ours
    expect(card.locator(".uppy-Dashboard-FileCard-actionsBtn")).to_have_text(["Angaben speichern", "Abbrechen"])  # Uppy's own German (@uppy/locales)
    card.get_by_text("Angaben speichern").click()
    row = page.locator("#file-details tbody tr").filter(has_text="web.raw")
    expect(row.locator("td").nth(1)).to_have_text("Nicht angegeben")
    expect(row.get_by_role("button", name="Angaben von web.raw bearbeiten")).to_be_visible()
    screenshot(page, tmp_path, "upload-de.png")  # the README's German page (make screenshots)

    page.get_by_role("button", name="1 Datei hochladen").click()
    expect(page.locator("#upload-done")).to_be_visible(timeout=60_000)
    expect(page.locator("#upload-done")).to_contain_text("Ihre Dateien sind im Portal")
    upload = wait_for(lambda: Upload.objects.filter(filename="web.raw").first(), what="the upload row")
    page.goto(f"{live_server.url}/uploads/{upload.uid}/")
    expect(page.locator("[data-live=badge]")).to_have_text("Empfangen")
    expect(page.get_by_role("button", name="Upload abbrechen")).to_be_visible()
