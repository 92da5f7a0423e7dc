"""Review in a real browser, two people at once: alice uploads, carol reviews (two browser
contexts, so two sessions). Rejected with a reason, alice sees why, uploads a fixed file, carol
approves it from the queue, and alice sees it Ready without reloading. alice's mails (rejected,
then ready) arrive, and she reads the rejected upload's page in German as well.

The worker's part runs in this test's thread (services.upload_push against the simulator); the
tasks the services would queue are caught (task_queue), so no other module's worker sees them.
"""

import time

import pytest
from django.contrib.auth.models import Permission
from django.core import mail

from tests.conftest import connect_cloud
from tests.test_browser import browser_page, qcow2_file, screenshot  # noqa: F401  (browser_page: a fixture)
from uploads import services
from uploads.models import Status, Upload

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def sign_in(page, live_server, name: str):
    page.goto(f"{live_server.url}/accounts/login/")
    page.fill("#id_username", name)
    page.fill("#id_password", f"{name}-pw-1234")
    page.click("button[type=submit]")
    page.wait_for_url(lambda url: "/accounts/login/" not in url)


def upload_file(page, path) -> Upload:
    """Upload one file on the upload page, as a person does; returns its row."""
    page.locator(".uppy-Dashboard-input").first.set_input_files(str(path))
    card = page.locator(".uppy-Dashboard-FileCard")
    card.wait_for()
    card.get_by_text("Save details").click()
    page.click(".uppy-StatusBar-actionBtn--upload")
    page.wait_for_selector("#upload-done", state="visible")
    return Upload.objects.get(filename=path.name)


def pushed(upload: Upload) -> Upload:
    """What the worker does with the upload's push message."""
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    return upload


def mail_arrives(address: str, subject_part: str, timeout: float = 30):
    """The mail to `address` whose subject holds `subject_part`, once it is in the outbox."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [m for m in mail.outbox if m.to == [address] and subject_part in m.subject]
        if found:
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"no mail to {address} about {subject_part!r}: {[m.subject for m in mail.outbox]}")


@pytest.fixture
def mails_here(settings, monkeypatch):
    """Mails are sent in this process (the live server's thread or the test's) to Django's outbox."""
    from portal.celery import app

    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    monkeypatch.setattr(app.conf, "task_always_eager", True)


@pytest.fixture
def carol(django_user_model):
    user = django_user_model.objects.create_user("carol", "carol@example.com", "carol-pw-1234")
    user.user_permissions.add(Permission.objects.get(codename="review_upload"))
    return user


def test_rejected_with_a_reason_then_a_fixed_file_approved_and_ready(
    live_server, settings, alice, carol, sim, task_queue, mails_here, browser_page, tmp_path  # noqa: F811
):
    settings.UPLOAD_REVIEW_REQUIRED = True
    connect_cloud(alice)
    uploader = browser_page
    uploader.set_default_timeout(30_000)
    reviewer = uploader.context.browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    reviewer.set_default_timeout(30_000)
    sign_in(uploader, live_server, "alice")
    sign_in(reviewer, live_server, "carol")

    # alice uploads; the check passes and the upload waits for a reviewer.
    uploader.goto(f"{live_server.url}/upload/")
    first = upload_file(uploader, qcow2_file(tmp_path))
    uploader.click("text=See progress on My uploads")
    card = uploader.locator("li.upload", has_text=first.filename)
    assert pushed(first).status == Status.AWAITING_REVIEW
    card.locator('[data-live="badge"]', has_text="Awaiting review").wait_for()  # live, no reload

    # carol finds it in the queue (the header counts it) and rejects it with a reason.
    reviewer.goto(f"{live_server.url}/review/")
    assert reviewer.locator("[data-review-link] .nav-count").inner_text() == "1"
    reviewer.get_by_role("link", name=first.name).click()
    reviewer.locator("[data-ims-body]").wait_for()
    assert '"disk_format": "qcow2"' in reviewer.locator("[data-ims-body]").inner_text()
    screenshot(reviewer, tmp_path, "review-page.png")
    reviewer.get_by_label("Reason (needed to reject; the owner reads it)").fill("Install cloud-init first, please.")
    reviewer.get_by_role("button", name="Reject").click()
    reviewer.get_by_text("Rejected 1 upload").wait_for()

    # alice sees the reason and the way on, without reloading.
    card.locator('[data-live="badge"]', has_text="Rejected").wait_for()
    assert "Install cloud-init first, please." in card.locator('[data-live="error-message"]').inner_text()
    rejected_mail = mail_arrives("alice@example.com", "was rejected by a reviewer")
    assert "Install cloud-init first, please." in rejected_mail.body
    assert f"/uploads/{first.uid}/" in rejected_mail.body

    # The same page in German, as a browser set to German shows it.
    german = uploader.context.browser.new_context(locale="de-DE", viewport={"width": 1280, "height": 900}).new_page()
    sign_in(german, live_server, "alice")
    german.goto(f"{live_server.url}/uploads/{first.uid}/")
    assert german.locator("html").get_attribute("lang") == "de"
    german.locator('[data-live="badge"]', has_text="Abgelehnt").wait_for()
    assert "Install cloud-init first, please." in german.locator('[data-live="error-message"]').inner_text()
    assert "Meine Uploads" in german.locator("nav").inner_text()
    screenshot(german, tmp_path, "rejected-de.png")
    german.context.close()

    again = card.locator('[data-live="upload_again"]')
    assert again.is_visible() and "button--primary" in again.get_attribute("class")
    screenshot(uploader, tmp_path, "rejected.png")
    again.click()
    uploader.wait_for_url(f"{live_server.url}/upload/")

    fixed_path = tmp_path / "fixed"
    fixed_path.mkdir()
    fixed = upload_file(uploader, qcow2_file(fixed_path).rename(fixed_path / "web-server-fixed.qcow2"))
    assert pushed(fixed).status == Status.AWAITING_REVIEW
    uploader.goto(f"{live_server.url}/uploads/{fixed.uid}/")
    uploader.locator('[data-live="badge"]', has_text="Awaiting review").wait_for()

    # carol approves it from the queue; the push (here: this thread) sends it to IMS.
    reviewer.goto(f"{live_server.url}/review/")
    reviewer.get_by_label(f"Select {fixed.name}").check()
    screenshot(reviewer, tmp_path, "review-queue.png")
    reviewer.get_by_role("button", name="Approve selected").click()
    reviewer.get_by_text("Approved 1 upload").wait_for()
    assert Upload.objects.get(pk=fixed.pk).status == Status.RECEIVED and ("push", fixed.pk) in task_queue
    assert pushed(fixed).status == Status.READY

    uploader.locator('[data-live="badge"]', has_text="Ready").wait_for()
    assert fixed.ims_image_id in uploader.locator('[data-live="image-id"]').inner_text()
    assert [image["name"] for image in sim.images()] == [fixed.name]  # the rejected one never reached IMS
    ready_mail = mail_arrives("alice@example.com", "is ready in IMS")
    assert fixed.ims_image_id in ready_mail.body and f"/uploads/{fixed.uid}/" in ready_mail.body
