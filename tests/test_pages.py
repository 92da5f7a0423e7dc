"""The pages people see: their own uploads only, live status JSON, Retry/Cancel, admin."""

import json
import re

import pytest
from django.test import Client

from uploads import services
from uploads.forms import UploadMetadataForm
from uploads.models import Status, Upload, UploadEvent
from uploads.views import UPLOAD_PAGE_WORDS

HOSTILE = '<script>alert("x")</script>'


@pytest.fixture
def upload(alice):
    return Upload.objects.create(
        owner=alice, name=HOSTILE, filename="disk.qcow2", disk_format="qcow2", size=2048,
        received_bytes=1024, staged_name="x.img",
    )


def test_my_uploads_lists_only_my_own(alice_client, upload, bob):
    Upload.objects.create(owner=bob, name="bobs-image", filename="b.raw", disk_format="raw", size=1, staged_name="b")
    page = alice_client.get("/uploads/").content.decode()
    assert "disk.qcow2" in page
    assert "bobs-image" not in page


def test_html_in_names_is_shown_as_text_everywhere(alice_client, upload, admin_client):
    for url in ["/uploads/", f"/uploads/{upload.uid}/", "/admin/uploads/upload/",
                f"/admin/uploads/upload/{upload.pk}/change/"]:
        c = admin_client if url.startswith("/admin") else alice_client
        page = c.get(url).content.decode()
        assert HOSTILE not in page, url
        assert "&lt;script&gt;" in page, url


def test_status_json_tells_the_phase_and_progress(alice_client, upload):
    data = alice_client.get(f"/uploads/{upload.uid}/status").json()
    assert data["status"] == "receiving" and data["status_label"] == "Receiving"
    assert (data["received_bytes"], data["size"], data["progress_percent"]) == (1024, 2048, 50)
    assert data["finished"] is False and data["can_cancel"] is True and data["can_retry"] is False


def test_progress_is_written_in_human_sizes_on_the_page_and_in_the_json(alice_client, upload):
    Upload.objects.filter(pk=upload.pk).update(size=1073741824, received_bytes=327155712)
    assert "312 MB of 1.0 GB received" in alice_client.get("/uploads/").content.decode()
    assert alice_client.get(f"/uploads/{upload.uid}/status").json()["detail"] == "312 MB of 1.0 GB received"
    Upload.objects.filter(pk=upload.pk).update(status=Status.PUSHING, send_size=16 * 1024**2,
                                               sent_bytes=8 * 1024**2, send_rate=2 * 1024**2)
    detail = alice_client.get(f"/uploads/{upload.uid}/status").json()["detail"]
    assert detail == "8.0 MB of 16 MB sent · 2.0 MB/s · less than a minute left"


def test_status_json_while_sending_has_rate_and_eta(alice_client, upload):
    Upload.objects.filter(pk=upload.pk).update(status=Status.PUSHING, sent_bytes=1024, send_rate=512.0)
    data = alice_client.get(f"/uploads/{upload.uid}/status").json()
    assert (data["status_label"], data["sent_bytes"], data["send_rate"], data["eta_seconds"]) == (
        "Sending to IMS", 1024, 512, 2)


def test_other_peoples_uploads_are_404(upload, bob):
    other = Client()
    other.force_login(bob)
    for url in [f"/uploads/{upload.uid}/", f"/uploads/{upload.uid}/status"]:
        assert other.get(url).status_code == 404
    for url in [f"/uploads/{upload.uid}/retry", f"/uploads/{upload.uid}/cancel"]:
        assert other.post(url).status_code == 404
    upload.refresh_from_db()
    assert upload.status == Status.RECEIVING


def test_status_json_costs_one_query_for_the_owner(alice_client, upload, django_assert_num_queries):
    # Polled by every open page: session, owner and upload come in one round trip.
    with django_assert_num_queries(1):
        response = alice_client.get(f"/uploads/{upload.uid}/status")
    assert response.json()["id"] == str(upload.uid)
    assert "no-store" in response["Cache-Control"] and "Cookie" in response["Vary"]


def test_status_json_of_someone_elses_upload_is_404_on_either_path(upload, bob, settings):
    other = Client()
    other.force_login(bob)
    assert other.get(f"/uploads/{upload.uid}/status").status_code == 404
    assert other.get("/uploads/00000000-0000-0000-0000-000000000000/status").status_code == 404
    settings.SESSION_ENGINE = "django.contrib.sessions.backends.signed_cookies"  # Django's own path
    other = Client()
    other.force_login(bob)
    assert other.get(f"/uploads/{upload.uid}/status").status_code == 404


def test_status_json_signs_out_a_session_whose_password_changed(alice_client, alice, upload):
    assert alice_client.get(f"/uploads/{upload.uid}/status").status_code == 200
    alice.set_password("a new one")
    alice.save()
    response = alice_client.get(f"/uploads/{upload.uid}/status")
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")


def test_status_json_refuses_an_inactive_owner(alice_client, alice, upload):
    type(alice).objects.filter(pk=alice.pk).update(is_active=False)
    response = alice_client.get(f"/uploads/{upload.uid}/status")
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")


def test_status_json_refuses_an_expired_or_unknown_session(alice_client, upload):
    from django.contrib.sessions.models import Session

    Session.objects.update(expire_date="2000-01-01T00:00:00Z")
    assert alice_client.get(f"/uploads/{upload.uid}/status").status_code == 302
    alice_client.cookies["sessionid"] = "made-up"
    assert alice_client.get(f"/uploads/{upload.uid}/status").status_code == 302


def test_status_json_refuses_a_session_of_a_backend_not_allowed(alice_client, upload, settings):
    settings.AUTHENTICATION_BACKENDS = ["axes.backends.AxesStandaloneBackend"]
    response = alice_client.get(f"/uploads/{upload.uid}/status")
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")


def test_status_json_works_with_other_session_engines(alice, upload, settings):
    settings.SESSION_ENGINE = "django.contrib.sessions.backends.signed_cookies"
    client = Client()
    client.force_login(alice)
    assert client.get(f"/uploads/{upload.uid}/status").json()["id"] == str(upload.uid)


def test_pages_need_sign_in(client, upload):
    for url in ["/", "/upload/", "/uploads/", f"/uploads/{upload.uid}/", f"/uploads/{upload.uid}/status"]:
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith("/accounts/login/"), url


def test_cancel_button(alice_client, upload, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks() as callbacks:
        response = alice_client.post(f"/uploads/{upload.uid}/cancel", follow=True)
    assert "was cancelled" in response.content.decode()
    upload.refresh_from_db()
    assert upload.status == Status.CANCELLED
    assert len(callbacks) == 1  # the clean-up task


def test_retry_of_a_failed_upload(alice_client, upload, staging_dir, django_capture_on_commit_callbacks):
    (staging_dir / "x.img").write_bytes(b"x" * 2048)
    Upload.objects.filter(pk=upload.pk).update(status=Status.FAILED, error_message="boom")
    with django_capture_on_commit_callbacks() as callbacks:
        response = alice_client.post(f"/uploads/{upload.uid}/retry", {"next": "detail"})
    assert response["Location"] == f"/uploads/{upload.uid}/"
    upload.refresh_from_db()
    assert upload.status == Status.RECEIVED and upload.error_message == ""
    assert len(callbacks) == 1


def test_retry_that_is_not_possible_says_why(alice_client, upload):
    response = alice_client.post(f"/uploads/{upload.uid}/retry", follow=True)
    assert "can be retried" in response.content.decode()


def test_failed_uploads_show_the_reason_and_what_to_do(alice_client, upload):
    Upload.objects.filter(pk=upload.pk).update(
        status=Status.FAILED, error_message="The cloud had a problem.", error_hint="Press Retry later."
    )
    page = alice_client.get("/uploads/").content.decode()
    assert "The cloud had a problem." in page and "Press Retry later." in page


def test_owners_never_see_the_raw_reply_but_admins_do(alice_client, admin_client, upload):
    UploadEvent.objects.create(upload=upload, message="Sending failed", detail="HTTP 500 RAW-REPLY-BODY")
    assert "RAW-REPLY-BODY" not in alice_client.get(f"/uploads/{upload.uid}/").content.decode()
    page = admin_client.get(f"/admin/uploads/upload/{upload.pk}/change/").content.decode()
    assert "RAW-REPLY-BODY" in page and "Sending failed" in page


def test_admin_lists_filters_and_searches(admin_client, upload, bob):
    Upload.objects.create(owner=bob, name="bobs-image", filename="b.raw", disk_format="raw", size=1, staged_name="b")
    page = admin_client.get("/admin/uploads/upload/").content.decode()
    assert "bobs-image" in page and "disk.qcow2" in page and "50 % received" in page
    page = admin_client.get("/admin/uploads/upload/?status__exact=receiving&q=bobs").content.decode()
    assert "bobs-image" in page and "disk.qcow2" not in page
    assert f"owner__id__exact={bob.pk}" in admin_client.get("/admin/uploads/upload/").content.decode()


def test_admin_cancel_action(admin_client, upload, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks():
        admin_client.post(
            "/admin/uploads/upload/",
            {"action": "cancel_uploads", "_selected_action": [upload.pk]},
        )
    upload.refresh_from_db()
    assert upload.status == Status.CANCELLED
    assert upload.events.filter(message="Cancelled by admin").exists()


def test_admin_never_shows_tokens(admin_client, alice_with_token):
    page = admin_client.get(f"/admin/uploads/cloudaccount/{alice_with_token.cloud_account.pk}/change/")
    assert alice_with_token.cloud_account.token_encrypted not in page.content.decode()
    assert "made-up-token" not in page.content.decode()


def test_the_service_refuses_to_cancel_a_finished_upload(upload):
    Upload.objects.filter(pk=upload.pk).update(status=Status.READY)
    upload.refresh_from_db()
    with pytest.raises(services.ServiceError):
        services.upload_cancel(upload=upload, by="alice")


def test_the_upload_page_takes_its_limits_and_words_from_the_server(alice_client, alice_with_token):
    page = alice_client.get("/upload/").content.decode()

    def script(name):
        return json.loads(re.search(rf'<script id="{name}" type="application/json">(.*?)</script>', page).group(1))

    limits = script("upload-limits")
    fields = UploadMetadataForm.base_fields
    assert limits["min_ram"] == {"min": fields["min_ram"].min_value, "max": fields["min_ram"].max_value}
    assert limits["tags"]["max_length"] == fields["tags"].max_length
    assert script("upload-words")["cancelled"] == UPLOAD_PAGE_WORDS["cancelled"] == (
        "Cancelled on My uploads: nothing more is sent.")
    assert f'max="{fields["min_ram"].max_value}"' in page  # the "Same for every file" field
    assert 'data-status-url="/uploads/00000000-0000-0000-0000-000000000000/status"' in page


@pytest.mark.parametrize(("status", "active"), [
    (Status.RECEIVING, True), (Status.RECEIVED, False), (Status.CHECKING, True), (Status.PUSHING, True),
    (Status.PROCESSING, True), (Status.FAILED, False), (Status.RECONNECT, False), (Status.READY, False),
])
def test_the_status_json_and_the_bar_say_whether_the_upload_is_active(alice_client, upload, status, active):
    Upload.objects.filter(pk=upload.pk).update(status=status)
    assert alice_client.get(f"/uploads/{upload.uid}/status").json()["active"] is active
    page = alice_client.get("/uploads/").content.decode()
    assert ("bar bar--active" in page) is active


def test_the_size_limit_is_said_as_the_settings_set_it(alice_client, alice_with_token, settings):
    settings.UPLOAD_MAX_BYTES = 64 * 1024**3 - 1
    footer = alice_client.get("/uploads/").content.decode()
    assert "smaller than 64 GB" in footer and "128 GB" not in footer
    page = alice_client.get("/upload/").content.decode()
    words = json.loads(re.search(r'id="upload-words"[^>]*>(.*?)</script>', page, re.S).group(1))
    assert words["too_large"] == "The file is 64 GB or larger; IMS takes only smaller images."
    assert words["too_large_file"].startswith("“%{file}” is 64 GB or larger")
    assert "128 GB" not in page
    form = UploadMetadataForm({"filename": "a.qcow2", "size": 64 * 1024**3})
    assert not form.is_valid() and "64 GB or larger" in str(form.errors["size"])
