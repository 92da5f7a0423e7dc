"""All uploads and the dashboard in a real browser on a 1280 px laptop screen: nothing scrolls
sideways (long names and reasons included), the page's CSP lets everything run (no console
errors), the dashboard fetches the workers part by itself, and the filters work from the form."""

from datetime import timedelta

import pytest
from django.utils import timezone

from tests.test_browser import browser_page, screenshot  # noqa: F401  (browser_page: a fixture)
from tests.test_browser_review import sign_in
from tests.test_review import make_reviewer
from uploads.models import CloudAccount, Status, Upload, UploadEvent

pytestmark = [pytest.mark.browser, pytest.mark.slow]

NO_SIDEWAYS_SCROLL = "() => document.documentElement.scrollWidth <= window.innerWidth"


@pytest.fixture
def many_uploads(alice, bob):
    """Uploads in every state, some with names, file names and reasons as long as people make them."""
    CloudAccount.objects.create(user=alice, domain_name="d", user_name="u", project_name="eu-de-platform-images-prod",
                                token_encrypted="x", expires_at=timezone.now())
    long_word = "ubuntu-22.04-server-cloudimg-amd64-with-monitoring-agent-and-hardening-" * 3
    for number, status in enumerate(Status.values * 4):
        upload = Upload.objects.create(
            owner=alice if number % 2 else bob, name=f"{long_word}{number}" if number % 5 == 0 else f"image-{number}",
            filename=f"{long_word}{number}.qcow2", disk_format="qcow2", size=(number + 1) * 3 * 1024**3,
            status=status, staged_name=f"s{number}", received_bytes=1024**3, sent_bytes=1024**3 // 2,
            error_code="server" if status in {"failed", "refused", "rejected", "reconnect"} else "",
            error_message="The cloud's image service had a temporary problem. " * 4, send_rate=40 * 1024**2,
            heartbeat_at=timezone.now(), push_started_at=timezone.now(),
        )
        if status == "processing":
            event = UploadEvent.objects.create(upload=upload, from_status="pushing", to_status="processing", message="x")
            UploadEvent.objects.filter(pk=event.pk).update(at=timezone.now() - timedelta(days=number % 30))


def test_all_uploads_fits_a_laptop_screen_and_filters_from_its_form(
    live_server, django_user_model, many_uploads, browser_page, tmp_path  # noqa: F811
):
    make_reviewer(django_user_model, "carol")
    page = browser_page
    sign_in(page, live_server, "carol")
    page.goto(f"{live_server.url}/review/all/")
    assert page.locator("[data-all-row]").count() == 50
    assert page.evaluate(NO_SIDEWAYS_SCROLL), "the list scrolls sideways at 1280 px"
    table = page.locator(".all-table")
    assert table.evaluate("t => t.scrollWidth <= t.parentElement.clientWidth")
    page.set_viewport_size({"width": 1280, "height": 1100})
    screenshot(page, tmp_path, "all-uploads.png", full_page=False)  # the top: a laptop screen's worth

    page.get_by_label("State").select_option("failed")
    page.get_by_role("button", name="Show").click()
    page.wait_for_url("**state=failed**")
    assert page.locator("[data-all-row]").count() == 4
    assert "4 uploads match the filters" in page.locator("[data-all-count]").inner_text()
    assert "state=failed" in page.locator("[data-csv-link]").get_attribute("href")


def test_the_dashboard_fits_and_asks_for_the_workers_by_itself(
    live_server, django_user_model, many_uploads, browser_page, tmp_path  # noqa: F811
):
    make_reviewer(django_user_model, "carol")
    page = browser_page
    sign_in(page, live_server, "carol")
    page.goto(f"{live_server.url}/review/dashboard/")
    page.locator("[data-workers-report]").wait_for(timeout=15_000)  # fetched after the page showed
    assert page.locator("[data-workers-asking]").count() == 0
    assert page.locator("svg.bar-chart rect").count() == 30
    assert page.evaluate(NO_SIDEWAYS_SCROLL), "the dashboard scrolls sideways at 1280 px"
    screenshot(page, tmp_path, "dashboard.png")
