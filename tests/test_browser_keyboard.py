"""With the keyboard alone, in a real browser (Debian's chromium through Playwright): an upload from
choosing the file to My uploads, and a reviewer's approve and reject, pressing only Tab,
Shift+Tab, Enter, Space and typing. Every control reached shows where the focus is, and focus
goes where the next step is. And what a screen reader hears: the polite live regions of the
upload page and of an upload's own page change with each step, not with every percent.

No Celery worker: the pushes run in the test's thread (services.upload_push against the
simulator), and the tasks the services would queue are caught (task_queue).
"""

import pytest
from django.contrib.auth.models import Permission
from playwright.sync_api import expect

from tests.accessibility import assert_accessible
from tests.conftest import connect_cloud, make_image, wait_for
from tests.scene import MiB, pushed, qcow2_image, received
from tests.test_browser import browser_page  # noqa: F401  (a fixture)
from tests.test_browser_pages import Visitors, scene, sign_in  # noqa: F401  (scene: a fixture)
from tests.test_browser_upload import throttle
from uploads import services
from uploads.models import Status, Upload

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# What has the focus: its tag, id or first class, and the name a screen reader would say.
FOCUSED = """() => {
    const el = document.activeElement
    if (!el || el === document.body) return {where: 'body', visible: false}
    const name = (el.getAttribute('aria-label') || el.labels?.[0]?.textContent || el.textContent || el.value || '')
        .replace(/\\s+/g, ' ').trim().slice(0, 60)
    const where = el.tagName.toLowerCase() + (el.id ? '#' + el.id : el.classList[0] ? '.' + el.classList[0] : '')
    // The portal's ring (portal.css :focus-visible): a solid outline of 2 px or more, not transparent.
    const style = getComputedStyle(el)
    const ring = el.matches(':focus-visible') && style.outlineStyle === 'solid' &&
        parseFloat(style.outlineWidth) >= 2 && !/rgba\\(.*, 0\\)$|transparent/.test(style.outlineColor)
    return {where, name, visible: ring, outline: `${style.outlineStyle} ${style.outlineWidth} ${style.outlineColor}`}
}"""


def focused(page) -> dict:
    return page.evaluate(FOCUSED)


def tab_to(page, target, *, back: bool = False, most: int = 40) -> list[dict]:
    """Press Tab (Shift+Tab with `back`) until `target` (a Locator) has the focus; returns the
    controls passed on the way. Fails, listing them, when it is not reached (a trap, or not
    reachable), or when one of them shows no focus ring."""
    passed = []
    for _ in range(most):
        page.keyboard.press("Shift+Tab" if back else "Tab")
        now = focused(page)
        passed.append(now)
        assert now["where"] == "body" or now["visible"], f"no visible focus on {now}; passed {passed}"
        if target.evaluate("el => el === document.activeElement"):
            return passed
    raise AssertionError(f"{target} not reached with {'Shift+' if back else ''}Tab; passed {passed}")


def expect_focused(locator):
    expect(locator).to_be_focused()


@pytest.fixture
def page(browser_page, live_server, transactional_db, alice, sim, task_queue):  # noqa: F811
    connect_cloud(alice)
    browser_page.set_default_timeout(20_000)
    sign_in(browser_page, live_server, "alice")
    return browser_page


def test_an_upload_from_choosing_the_file_to_my_uploads_by_keyboard_alone(page, live_server, tmp_path):
    image = qcow2_image(tmp_path / "ubuntu-24.04-server.qcow2", data_mib=4)
    # Playwright takes over the file dialog once something listens for it, and tells the browser
    # so without waiting for an answer: listen from the start, long before Enter opens it.
    page.on("filechooser", lambda chooser: None)
    page.goto(f"{live_server.url}/upload/")

    # The first Tab offers the way past the header; Enter takes the focus to the content.
    page.keyboard.press("Tab")
    expect_focused(page.get_by_role("link", name="Skip to content"))
    page.keyboard.press("Enter")
    expect_focused(page.locator("main"))

    # The first control of the content chooses files; Enter opens the browser's file dialog.
    passed = tab_to(page, page.get_by_role("button", name="choose files"))
    assert len(passed) == 1, passed
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Enter")
    chooser.value.set_files(str(image))

    # The details of the file open by themselves, filled in from the file name, with the focus
    # in the first field.
    name = page.locator("#uppy-Dashboard-FileCard-input-image_name")
    expect(name).to_have_value("ubuntu-24.04-server")
    expect_focused(name)
    page.keyboard.press("Control+A")
    page.keyboard.type("ubuntu-web-2024")
    page.keyboard.press("Tab")
    expect_focused(page.locator("#uppy-Dashboard-FileCard-input-os_version"))
    page.keyboard.type("Ubuntu 24.04 server 64bit")
    tab_to(page, page.locator("#uppy-Dashboard-FileCard-input-min_ram"))
    page.keyboard.type("2048")
    # Back up one field and on again: Shift+Tab goes the same way backwards.
    page.keyboard.press("Shift+Tab")
    expect_focused(page.locator("#uppy-Dashboard-FileCard-input-min_disk"))
    save = page.get_by_role("button", name="Save details")
    tab_to(page, save)
    page.keyboard.press("Enter")
    row = page.locator("#file-details tbody tr")
    expect(row.locator(".file-table__name")).to_have_text("ubuntu-web-2024")
    expect(page.locator(".uppy-Dashboard :focus")).to_have_count(1)  # back in the file list, not lost

    # Upload: Space presses it as well as a click would.
    upload_button = page.locator(".uppy-StatusBar-actionBtn--upload")
    tab_to(page, upload_button, back=True)
    page.keyboard.press("Space")
    done = page.get_by_role("heading", name="Your files are in the portal")
    expect_focused(done)  # the focus follows to the outcome, which is read out
    upload = Upload.objects.get()
    assert (upload.name, upload.os_version, upload.min_ram) == ("ubuntu-web-2024", "Ubuntu 24.04 server 64bit", 2048)

    page.keyboard.press("Tab")
    expect_focused(page.get_by_role("link", name="ubuntu-web-2024"))
    page.keyboard.press("Tab")
    expect_focused(page.get_by_role("link", name="See progress on My uploads"))
    page.keyboard.press("Enter")
    page.wait_for_url(f"{live_server.url}/uploads/")

    # My uploads: past the header and the filters, the upload's own link comes first.
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")  # skip to content
    tab_to(page, page.get_by_role("link", name="ubuntu-web-2024", exact=True))
    page.keyboard.press("Enter")
    page.wait_for_url(f"{live_server.url}/uploads/{upload.uid}/")
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")
    tab_to(page, page.get_by_role("button", name="Cancel upload"))


@pytest.fixture
def carol(django_user_model):
    user = django_user_model.objects.create_user("carol", "carol@example.com", "carol-pw-1234")
    user.user_permissions.add(Permission.objects.get(codename="review_upload"))
    return user


def test_a_reviewer_approves_and_rejects_by_keyboard_alone(browser_page, live_server, transactional_db,  # noqa: F811
                                                           alice, carol, sim, task_queue, settings, tmp_path):
    connect_cloud(alice)
    settings.UPLOAD_REVIEW_REQUIRED = True
    first = pushed(received(alice, qcow2_image(tmp_path / "web-frontend-v3.qcow2", data_mib=2),
                            name="web-frontend-v3", disk_format="qcow2"))
    second = pushed(received(alice, qcow2_image(tmp_path / "reporting-db.qcow2", data_mib=2),
                             name="reporting-db", disk_format="qcow2"))
    third = pushed(received(alice, qcow2_image(tmp_path / "gitlab-runner.qcow2", data_mib=2),
                            name="gitlab-runner", disk_format="qcow2"))
    assert {first.status, second.status, third.status} == {Status.AWAITING_REVIEW}
    page = browser_page
    page.set_default_timeout(20_000)
    sign_in(page, live_server, "carol")
    page.goto(f"{live_server.url}/review/")

    # Approve the first from the queue: tick it with Space, then the Approve button.
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")  # skip to content
    pick = page.get_by_label("Select web-frontend-v3")
    passed = tab_to(page, pick)
    assert len(passed) == 1, passed  # the first control in the content
    page.keyboard.press("Space")
    expect(pick).to_be_checked()
    # Then the upload's own link, the next row's box, and so on, in reading order.
    page.keyboard.press("Tab")
    expect_focused(page.get_by_role("link", name="web-frontend-v3"))
    page.keyboard.press("Tab")
    expect_focused(page.get_by_label("Select reporting-db"))
    tab_to(page, page.get_by_role("button", name="Approve selected"))
    page.keyboard.press("Enter")
    expect(page.get_by_text("Approved 1 upload")).to_be_visible()
    assert Upload.objects.get(pk=first.pk).status == Status.RECEIVED
    # After the page came back, the first Tab is the way past the header again.
    page.keyboard.press("Tab")
    expect_focused(page.get_by_role("link", name="Skip to content"))

    # Reject the second from the queue: tick it, write the reason, past Approve to Reject.
    page.keyboard.press("Enter")
    tab_to(page, page.get_by_label("Select reporting-db"))
    page.keyboard.press("Space")
    reason = page.get_by_label("Reason (needed to reject; the owner reads it)")
    tab_to(page, reason)
    page.keyboard.type("Install cloud-init first, please.")
    page.keyboard.press("Tab")
    expect_focused(page.get_by_role("button", name="Approve selected"))
    page.keyboard.press("Tab")
    expect_focused(page.get_by_role("button", name="Reject selected"))
    page.keyboard.press("Enter")
    expect(page.get_by_text("Rejected 1 upload")).to_be_visible()
    second.refresh_from_db()
    assert (second.status, second.review_reason) == (Status.REJECTED, "Install cloud-init first, please.")

    # Reject the third from its review page.
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")
    tab_to(page, page.get_by_role("link", name="gitlab-runner"))
    page.keyboard.press("Enter")
    page.wait_for_url(f"{live_server.url}/review/{third.uid}/")
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")
    tab_to(page, page.get_by_label("Reason (needed to reject; the owner reads it)"))
    page.keyboard.type("Use the 2024 base image.")
    page.keyboard.press("Tab")
    expect_focused(page.get_by_role("button", name="Approve and send to IMS"))
    page.keyboard.press("Tab")
    expect_focused(page.get_by_role("button", name="Reject"))
    # The JSON sent to IMS scrolls, so it takes the focus (arrow keys scroll it) after the buttons.
    page.keyboard.press("Tab")
    expect_focused(page.locator("[data-ims-body]"))
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Enter")
    expect(page.get_by_text("Rejected 1 upload")).to_be_visible()
    third.refresh_from_db()
    assert (third.status, third.review_reason) == (Status.REJECTED, "Use the 2024 base image.")


def test_an_upload_s_own_page_announces_each_state_and_its_progress_in_quarters(page, live_server, alice, sim,
                                                                               tmp_path):
    upload = received(alice, make_image(tmp_path / "debian-12-genericcloud.raw", 10 * MiB),
                      name="debian-12-genericcloud", disk_format="raw")
    page.goto(f"{live_server.url}/uploads/{upload.uid}/")
    region = page.locator('[data-upload] [data-live="announce"]')
    expect(region).to_have_attribute("aria-live", "polite")
    expect(region).to_have_text("")
    record_announcements(page, '[data-upload] [data-live="announce"]')
    polls = []
    page.on("request", lambda request: polls.append(request.url) if request.url.endswith("/status") else None)

    sim.set_faults(put_bytes_per_second=MiB, processing_seconds=600)  # about 10 seconds of sending
    pushed(upload)
    assert upload.status == Status.PROCESSING
    expect(region).to_have_text("debian-12-genericcloud: IMS processing.", timeout=20_000)
    sim.set_image_status(upload.ims_image_id, "active")
    services.upload_poll(upload_id=upload.pk)
    expect(region).to_have_text("debian-12-genericcloud: Ready.", timeout=20_000)

    said = announcements(page)
    assert said[0] == "debian-12-genericcloud: Sending to IMS.", said
    assert said[-2:] == ["debian-12-genericcloud: IMS processing.", "debian-12-genericcloud: Ready."], said
    # Each poll while sending brought a new percent; only whole quarters were said, once each.
    progress = said[1:-2]
    assert 1 <= len(progress) <= 3 and len(progress) == len(set(progress)), said
    assert set(progress) <= {f"debian-12-genericcloud: Sending to IMS, {n}%." for n in (25, 50, 75)}, said
    assert len(polls) > len(said), (polls, said)
    assert_accessible(page, context="an upload's page after it turned Ready live")


def record_announcements(page, selector: str):
    """Keep every text the live region at `selector` takes, in window.said."""
    page.evaluate("""(selector) => {
        window.said = []
        const region = document.querySelector(selector)
        new MutationObserver(() => { if (region.textContent) window.said.push(region.textContent) })
            .observe(region, {childList: true, characterData: true, subtree: true})
    }""", selector)


def announcements(page) -> list[str]:
    return page.evaluate("window.said")


def test_the_upload_page_announces_each_file_s_steps_not_every_percent(page, live_server, tmp_path):
    files = [make_image(tmp_path / "rocky-9-base.raw", 12 * MiB), make_image(tmp_path / "alpine-3.20.raw", 4 * MiB)]
    page.goto(f"{live_server.url}/upload/")
    region = page.locator("#upload-announcer")
    expect(region).to_have_attribute("aria-live", "polite")
    record_announcements(page, "#upload-announcer")
    page.locator(".uppy-Dashboard-input").first.set_input_files([str(f) for f in files])
    page.get_by_role("button", name="Save details").click()
    throttle(page, 4 * MiB)  # about 4 seconds: many progress events
    page.click(".uppy-StatusBar-actionBtn--upload")
    expect(page.locator("#upload-done .done-list li")).to_have_count(2, timeout=30_000)
    expect(region).to_contain_text("in the portal.")
    wait_for(lambda: sum("in the portal." in text for text in announcements(page)) >= 1, what="the outcome said")
    page.wait_for_timeout(1200)  # what came last is said after a second
    said = " ".join(announcements(page))
    assert said.startswith("Sending 2 files to the portal."), said
    for name in ("rocky-9-base.raw", "alpine-3.20.raw"):
        assert f"{name}: in the portal." in said, said
        percents = [part for part in said.split(f"{name}: ")[1:] if "% sent" in part.split(".")[0]]
        assert len(percents) <= 3, said
    assert said.count("% sent.") <= 6, said
    assert "rocky-9-base.raw: 50% sent." in said, said


# The controls Tab should stop at, in document order: visible, enabled, not taken out of the
# order (tabindex -1), no positive tabindex anywhere (which would jump the order).
TAB_STOPS = """() => {
    const selector = 'a[href], button, input:not([type=hidden]), select, textarea, summary, [tabindex]'
    const positive = [...document.querySelectorAll('[tabindex]')].filter(el => el.tabIndex > 0)
    const stops = [...document.querySelectorAll(selector)].filter(el =>
        el.tabIndex >= 0 && !el.disabled && el.checkVisibility({visibilityProperty: true}) &&
        !el.closest('[inert], details:not([open]) > :not(summary)'))
    return {positive: positive.map(el => el.outerHTML.slice(0, 80)), count: stops.length,
            stops: stops.map(el => el.outerHTML.slice(0, 80))}
}"""
KEYBOARD_PAGES = [  # (who, path) of tests/scene.py's portal
    ("alice", "/uploads/"),
    ("alice", "/uploads/{ready}/"),
    ("alice", "/uploads/{rejected}/"),
    ("carol", "/review/"),
    ("carol", "/review/{awaiting}/"),
    ("bob", "/upload/"),
    ("alice", "/profile/"),
]


def test_tab_reaches_every_control_in_order_with_a_visible_focus_and_nothing_traps_it(
        scene, live_server, browser_page):  # noqa: F811
    visitors = Visitors(browser_page, live_server)
    uids = {what: upload.uid for what, upload in scene.uploads.items()}
    for who, path in KEYBOARD_PAGES:
        page = visitors.page_for(who)
        page.goto(live_server.url + path.format(**uids))
        page.locator("main").wait_for()
        expected = page.evaluate(TAB_STOPS)
        assert expected["positive"] == [], f"{path}: a positive tabindex jumps the order: {expected['positive']}"
        # Tab once round the whole page: every stop shows the ring, then the focus leaves the
        # page (to the browser) and comes back to the first control, the skip link.
        page.keyboard.press("Tab")
        first = focused(page)
        assert first["name"] == "Skip to content", (path, first)
        stops = [first]
        for _ in range(expected["count"] + 5):
            page.keyboard.press("Tab")
            now = focused(page)
            if now["where"] == "body" or now == first:
                break
            assert now["visible"], f"{path}: no visible focus on {now}"
            stops.append(now)
        else:
            raise AssertionError(f"{path}: the focus never left the page; it went {stops}")
        assert len(stops) == expected["count"], (path, [s["where"] + " " + s["name"] for s in stops],
                                                 expected["stops"])
