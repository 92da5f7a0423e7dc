"""The profile page in a real browser, with the keyboard alone: a reviewer finds it in the header,
turns the review mails off, chooses German for the mails and saves."""

import pytest

from tests.test_browser import browser_page, screenshot  # noqa: F401  (browser_page: a fixture)
from tests.test_browser_review import carol, sign_in  # noqa: F401  (carol: a fixture)
from uploads.models import NotificationSettings

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_a_reviewer_turns_review_mails_off_and_chooses_german_with_the_keyboard(
    live_server, carol, browser_page, tmp_path  # noqa: F811
):
    page = browser_page
    page.set_default_timeout(30_000)
    sign_in(page, live_server, "carol")
    page.get_by_role("link", name="Profile").click()
    page.wait_for_url(f"{live_server.url}/profile/")
    outcomes = page.get_by_label("E-mail me when an upload of mine is ready or needs me")
    reviews = page.get_by_label("E-mail me when uploads await my review")
    assert outcomes.is_checked() and reviews.is_checked()
    outcomes.focus()
    page.keyboard.press("Tab")  # to the review switch
    page.keyboard.press("Space")
    page.keyboard.press("Tab")  # to the language
    assert page.evaluate("document.activeElement.name") == "language"
    page.get_by_label("Language of the e-mails").select_option("de")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent.trim()") == "Save"
    page.keyboard.press("Enter")
    page.get_by_text("Your e-mail settings are saved.").wait_for()
    screenshot(page, tmp_path, "profile.png")
    prefs = NotificationSettings.objects.get(user=carol)
    assert (prefs.mail_upload_outcomes, prefs.mail_review_requests, prefs.language) == (True, False, "de")
    assert not page.get_by_label("E-mail me when uploads await my review").is_checked()
