"""Every page a person uses, in the states they meet it, in a real browser (Debian's chromium
through Playwright, against the live portal and the IMS simulator): axe-core finds no serious or
critical problem on any of them (tests/accessibility.py).

`make screenshots` runs this file with UPDATE_SCREENSHOTS=1: the pages marked with a file name
below are the README's pictures (docs/screenshots/), taken of tests/scene.py's realistic uploads.
A new page is one more line in PAGES (a page in German: language="de", the browser's language).
"""

import re
from dataclasses import dataclass

import pytest
from playwright.sync_api import expect

from tests.accessibility import assert_accessible
from tests.scene import MiB, make_scene, qcow2_image
from tests.conftest import connect_cloud, make_image
from tests.test_browser import browser_page, screenshot  # noqa: F401  (browser_page: a fixture)
from tests.test_browser_upload import throttle

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@dataclass(frozen=True)
class Page:
    context: str  # what the failure message calls it
    who: str | None  # signed in as (None: nobody)
    path: str  # "{ready}" and the like: the uid of that upload of the scene
    picture: str = ""  # docs/screenshots/<picture> under `make screenshots`
    wait_for: str = "main"  # a selector that is there once the page is drawn
    language: str = ""  # the browser's language ("de"), when not English


PAGES = [
    Page("the sign-in page", None, "/accounts/login/", "sign-in.png"),
    Page("the upload page, cloud not connected", "dave", "/upload/"),
    Page("the upload page, nothing chosen yet", "bob", "/upload/", wait_for=".uppy-Dashboard"),
    Page("My uploads, none yet", "bob", "/uploads/"),
    Page("My uploads, uploads in many states", "alice", "/uploads/", "my-uploads.png", '[data-status="ready"]'),
    Page("My uploads, filtered to the failed ones", "alice", "/uploads/?state=failed"),
    Page("an upload's page, still uploading", "alice", "/uploads/{receiving}/", "detail-uploading.png"),
    Page("an upload's page, IMS processing", "alice", "/uploads/{processing}/"),
    Page("an upload's page, failed", "alice", "/uploads/{failed}/", "detail-failed.png"),
    Page("an upload's page, refused", "alice", "/uploads/{refused}/"),
    Page("an upload's page, awaiting review", "alice", "/uploads/{awaiting}/"),
    Page("an upload's page, rejected", "alice", "/uploads/{rejected}/", "detail-rejected.png"),
    Page("an upload's page, ready", "alice", "/uploads/{ready}/", "detail-ready.png"),
    Page("the cloud account page, connected", "alice", "/cloud/", "cloud-account.png"),
    Page("the cloud account page, not connected", "dave", "/cloud/"),
    Page("the profile page of a reviewer", "carol", "/profile/", "profile.png"),
    Page("the review queue", "carol", "/review/", "review-queue.png"),
    Page("the review page, awaiting review", "carol", "/review/{awaiting}/", "review-page.png"),
    Page("the review page, ready", "carol", "/review/{ready}/"),
    Page("the review page, failed", "carol", "/review/{failed}/"),
    Page("the review page of one's own upload", "carol", "/review/{carols}/"),
    Page("All uploads", "carol", "/review/all/"),
    Page("All uploads, filtered to the failed ones", "carol", "/review/all/?state=failed"),
    Page("the dashboard", "carol", "/review/dashboard/", wait_for="#workers-title"),
]


def sign_in(page, live_server, name: str):
    page.goto(f"{live_server.url}/accounts/login/")
    page.fill("#id_username", name)
    page.fill("#id_password", f"{name}-pw-1234")
    page.click("button[type=submit]")
    page.wait_for_url(lambda url: "/accounts/login/" not in url)


class Visitors:
    """One browser context (a session of its own) per person and language, signed in on first use."""

    def __init__(self, page, live_server):
        self.first, self.live_server, self.pages = page, live_server, {}

    def page_for(self, who, language: str = ""):
        if (who, language) not in self.pages:
            if not self.pages and not language:
                page = self.first
            else:
                options = {"locale": language} if language else {}
                page = self.first.context.browser.new_context(viewport={"width": 1280, "height": 900},
                                                              **options).new_page()
            page.set_default_timeout(20_000)
            if who:
                sign_in(page, self.live_server, who)
            self.pages[who, language] = page
        return self.pages[who, language]


@pytest.fixture
def scene(django_user_model, transactional_db, sim, settings, task_queue, tmp_path):
    folder = tmp_path / "files"
    folder.mkdir()
    return make_scene(django_user_model, sim, settings, folder)


def test_every_page_has_no_serious_or_critical_accessibility_problem(scene, live_server, browser_page, tmp_path):  # noqa: F811
    visitors = Visitors(browser_page, live_server)
    uids = {what: upload.uid for what, upload in scene.uploads.items()}
    problems = []
    for entry in PAGES:
        page = visitors.page_for(entry.who, entry.language)
        page.goto(live_server.url + entry.path.format(**uids))
        page.locator(entry.wait_for).first.wait_for()
        try:
            assert_accessible(page, context=entry.context)
        except AssertionError as problem:  # every page's problems in one report
            problems.append(str(problem))
        if entry.picture:
            screenshot(page, tmp_path, entry.picture)
    assert not problems, "\n\n".join(problems)


def test_the_lock_out_page_is_accessible(live_server, transactional_db, browser_page):  # noqa: F811
    page = browser_page
    for _ in range(5):
        page.goto(f"{live_server.url}/accounts/login/")
        page.fill("#id_username", "mallory")
        page.fill("#id_password", "guess")
        page.click("button[type=submit]")
    expect(page.get_by_role("heading", name="Sign-in paused")).to_be_visible()
    page.console_errors.clear()  # the browser logs the lock-out's 429 reply
    assert_accessible(page, context="the lock-out page")


def test_the_upload_page_is_accessible_at_every_step(live_server, transactional_db, bob, sim, task_queue,
                                                     browser_page, tmp_path):  # noqa: F811
    connect_cloud(bob)
    page = Visitors(browser_page, live_server).page_for("bob")
    page.goto(f"{live_server.url}/upload/")
    files = [qcow2_image(tmp_path / "ubuntu-24.04-minimal.qcow2", data_mib=8),
             make_image(tmp_path / "rocky-9-base.raw", 24 * MiB)]
    page.locator(".uppy-Dashboard-input").first.set_input_files([str(f) for f in files])
    card = page.locator(".uppy-Dashboard-FileCard")
    card.wait_for()
    assert_accessible(page, context="the upload page, the details of the first file open")
    card.get_by_text("Save details").click()
    expect(page.locator("#file-details tbody tr")).to_have_count(2)
    page.get_by_label("OS version", exact=True).fill("Ubuntu 24.04 server 64bit")
    page.get_by_role("button", name="Apply to all files").click()
    assert_accessible(page, context="the upload page, two files chosen")
    screenshot(page, tmp_path, "upload.png")

    throttle(page, 4 * MiB)
    page.click(".uppy-StatusBar-actionBtn--upload")
    expect(page.locator(".uppy-StatusBar-progress")).to_have_attribute("style", re.compile(r"width: *[1-9]"))
    assert_accessible(page, context="the upload page while files are sent")
    screenshot(page, tmp_path, "upload-sending.png")
    throttle(page, -1)
    expect(page.locator("#upload-done .done-list li")).to_have_count(2, timeout=60_000)
    assert_accessible(page, context="the upload page, every file in the portal")


def test_the_check_names_each_problem_with_its_rule_place_and_help(live_server, transactional_db, browser_page):  # noqa: F811
    page = browser_page
    page.goto(f"{live_server.url}/accounts/login/")
    # What a careless change could bring: a button without a name, an image without a text.
    page.evaluate("""() => {
        const button = document.createElement('button'); button.id = 'nameless'; button.innerHTML = '<svg></svg>'
        const image = document.createElement('img'); image.id = 'wordless'; image.src = '/static/img/logo.svg'
        document.querySelector('main').append(button, image)
    }""")
    with pytest.raises(AssertionError) as failure:
        assert_accessible(page, context="the sign-in page, broken on purpose")
    report = str(failure.value)
    assert "accessibility problems on the sign-in page, broken on purpose" in report
    assert "- button-name (critical): Buttons must have discernible text <https://dequeuniversity.com/rules/axe/" in report
    assert "at #nameless:" in report
    assert "- image-alt (critical)" in report and "at #wordless:" in report


def test_pages_that_say_what_went_wrong_are_accessible(scene, live_server, browser_page, tmp_path):  # noqa: F811
    visitors = Visitors(browser_page, live_server)
    nobody = visitors.page_for(None)
    nobody.goto(f"{live_server.url}/accounts/login/")
    nobody.fill("#id_username", "alice")
    nobody.fill("#id_password", "not her password")
    nobody.click("button[type=submit]")
    expect(nobody.locator(".alert--error")).to_be_visible()
    assert_accessible(nobody, context="the sign-in page, a wrong password")

    dave = visitors.page_for("dave")
    dave.goto(f"{live_server.url}/cloud/")
    dave.get_by_role("button", name="Connect", exact=True).click()
    expect(dave.locator("[aria-invalid=true]").first).to_be_visible()
    assert_accessible(dave, context="the cloud account page, fields left empty")

    carol = visitors.page_for("carol")
    carol.goto(f"{live_server.url}/review/")
    carol.get_by_label("Select web-frontend-v3").check()
    carol.get_by_role("button", name="Reject selected").click()
    expect(carol.locator(".message--error")).to_contain_text("Write why")
    assert_accessible(carol, context="the review queue, a reject without a reason")

    bob = visitors.page_for("bob")
    bob.goto(f"{live_server.url}/upload/")
    notes = tmp_path / "notes.txt"
    notes.write_text("not a disk image")
    bob.locator(".uppy-Dashboard-input").first.set_input_files(str(notes))
    expect(bob.locator("#upload-problems")).to_contain_text("notes.txt")
    assert_accessible(bob, context="the upload page, a file that is no disk image")


def test_pages_on_a_phone_have_no_serious_or_critical_accessibility_problem(scene, live_server, browser_page):  # noqa: F811
    phone = browser_page.context.browser.new_context(viewport={"width": 320, "height": 640}, is_mobile=True,
                                                     has_touch=True).new_page()
    phone.set_default_timeout(20_000)
    uids = {what: upload.uid for what, upload in scene.uploads.items()}
    problems = []
    for who, entries in [("alice", [p for p in PAGES if p.who == "alice"]),
                         ("carol", [p for p in PAGES if p.who == "carol"][:2])]:
        phone.context.clear_cookies()
        sign_in(phone, live_server, who)
        for entry in entries:
            phone.goto(live_server.url + entry.path.format(**uids))
            phone.locator(entry.wait_for).first.wait_for()
            try:
                assert_accessible(phone, context=f"{entry.context}, 320 px wide")
            except AssertionError as problem:
                problems.append(str(problem))
            # Reflow (WCAG 1.4.10): the page itself never scrolls sideways; a wide table may, in its box.
            wide = phone.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
            if wide > 0:
                problems.append(f"{entry.context}, 320 px wide: the page is {wide} px wider than the screen")
    assert not problems, "\n\n".join(problems)
