"""E-mail: owners hear when an upload is ready, failed, refused, rejected or waits for a reconnect;
reviewers hear of uploads awaiting review at most once per 15 minutes; each person can turn either
off and chooses the language; a mail is sent once, by a task, and its failure changes no upload.

The Celery tasks run eagerly here (the same task code, without a broker), after the move's commit
as in production; Django's test outbox (locmem) holds what was sent. tests/test_mail_smtp.py sends
through a real SMTP server with a real worker."""

import os
import re
import socket
from datetime import timedelta

import pytest
from django.core import mail
from django.utils import timezone

from tests.conftest import connect_cloud
from tests.test_pipeline import DATA, received_upload, timeline
from tests.test_review import make_reviewer
from uploads import notifications, review, services, tasks
from uploads.models import NotificationSettings, Status, Upload, UploadEvent, UploadMail

BASE = "https://portal.example.test"


@pytest.fixture(autouse=True)
def mail_setup(settings, monkeypatch):
    """Tasks run in this process when sent; links point at the portal's public address."""
    from portal.celery import app

    settings.PORTAL_BASE_URL = BASE
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    monkeypatch.setattr(app.conf, "task_always_eager", True)


@pytest.fixture
def carol(django_user_model):
    return make_reviewer(django_user_model, "carol")


@pytest.fixture
def dave(django_user_model):
    return make_reviewer(django_user_model, "dave")


@pytest.fixture
def review_on(settings):
    settings.UPLOAD_REVIEW_REQUIRED = True


def pushed(owner, data=DATA, *, committed, **kwargs) -> Upload:
    """A received upload, pushed by the service as the worker would; its mails go out on commit."""
    upload = received_upload(owner, data, **kwargs)
    with committed(execute=True):
        services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    return upload


def mails_to(address: str) -> list:
    return [m for m in mail.outbox if m.to == [address]]


def html_of(message) -> str:
    [(html, kind)] = message.alternatives
    assert kind == "text/html"
    return html


# ---------------------------------------------------------------------------------------------
# The owner, for each outcome


def test_the_owner_is_mailed_once_when_the_upload_is_ready(alice_connected, sim, django_capture_on_commit_callbacks):
    upload = pushed(alice_connected, committed=django_capture_on_commit_callbacks)
    assert upload.status == Status.READY
    [message] = mail.outbox
    assert message.to == ["alice@example.com"]
    assert message.subject == "“web-server” is ready in IMS"
    link = f"{BASE}/uploads/{upload.uid}/"
    assert upload.ims_image_id in message.body and link in message.body
    assert f'href="{link}"' in html_of(message) and upload.ims_image_id in html_of(message)
    assert f"{BASE}/profile/" in message.body  # where to turn it off
    token = services.cloud.owner_token(alice_connected.pk).value
    assert token and token not in message.body and token not in html_of(message)
    assert UploadMail.objects.get(upload=upload).kind == Status.READY


def test_the_owner_is_mailed_when_the_upload_failed(alice_connected, sim, django_capture_on_commit_callbacks):
    sim.set_faults(processing_seconds=60)
    upload = pushed(alice_connected, committed=django_capture_on_commit_callbacks)
    assert upload.status == Status.PROCESSING and not mail.outbox  # no mail on the way
    sim.set_image_status(upload.ims_image_id, "killed")
    with django_capture_on_commit_callbacks(execute=True):
        services.upload_poll(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.FAILED
    [message] = mail.outbox
    assert message.subject == "“web-server” could not be sent to IMS"
    assert upload.error_message in message.body and upload.error_hint in message.body
    assert "ims_killed" not in message.body  # the admin's code and IMS's raw reply stay in the portal


def test_the_owner_is_mailed_when_the_file_check_refused_it(alice_connected, sim, django_capture_on_commit_callbacks):
    upload = pushed(alice_connected, bytes(512) + os.urandom(200_000), disk_format="qcow2",
                    committed=django_capture_on_commit_callbacks)
    assert upload.status == Status.REFUSED
    [message] = mail.outbox
    assert message.subject == "“web-server” was refused by the file check"
    assert upload.error_message in message.body and f"{BASE}/uploads/{upload.uid}/" in message.body


def test_the_owner_is_mailed_when_the_cloud_sign_in_expired(alice_connected, sim, django_capture_on_commit_callbacks):
    sim.set_faults(expire_tokens=True)
    upload = pushed(alice_connected, committed=django_capture_on_commit_callbacks)
    assert upload.status == Status.RECONNECT
    [message] = mail.outbox
    assert message.subject == "“web-server” waits for you to reconnect your cloud account"
    assert f"{BASE}/cloud/" in message.body and f'href="{BASE}/cloud/"' in html_of(message)


def test_the_owner_is_mailed_the_reason_when_a_reviewer_rejects(
    alice_connected, carol, sim, review_on, django_capture_on_commit_callbacks
):
    upload = pushed(alice_connected, committed=django_capture_on_commit_callbacks)
    assert upload.status == Status.AWAITING_REVIEW
    assert [m.to for m in mail.outbox] == [["carol@example.com"]]  # the reviewer's mail
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        review.upload_reject(upload=upload, by=carol, reason="Remove the SSH host keys first.")
    assert callbacks  # queued for after the commit, not sent by the reviewer's request itself
    [message] = mails_to("alice@example.com")
    assert message.subject == "“web-server” was rejected by a reviewer"
    assert "Remove the SSH host keys first." in message.body
    assert f"{BASE}/upload/" in message.body  # upload a fixed file


def test_the_reviewers_request_only_queues_the_mail_which_a_task_sends(
    alice_connected, carol, client, sim, review_on, django_capture_on_commit_callbacks
):
    upload = pushed(alice_connected, committed=django_capture_on_commit_callbacks)
    mail.outbox.clear()
    client.force_login(carol)
    with django_capture_on_commit_callbacks() as queued:
        response = client.post("/review/decide", {"decision": "reject", "uid": str(upload.uid), "reason": "No."})
    assert response.status_code == 302 and Upload.objects.get(pk=upload.pk).status == Status.REJECTED
    assert mail.outbox == [] and len(queued) == 1  # the request sent nothing: it queued a task
    queued[0]()  # the commit's hook sends the task (run here, eagerly)
    assert [m.to for m in mail.outbox] == [["alice@example.com"]]


def test_a_second_failure_after_a_retry_mails_again(alice_connected, sim, django_capture_on_commit_callbacks, task_queue):
    sim.set_faults(expire_tokens=True)
    upload = pushed(alice_connected, committed=django_capture_on_commit_callbacks)
    connect_cloud(alice_connected)  # requeues it (caught by task_queue)
    sim.set_faults(expire_tokens=True)  # and the new sign-in is refused too
    with django_capture_on_commit_callbacks(execute=True):
        services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.RECONNECT  # the simulator still refuses the token
    assert len(mail.outbox) == 2 and UploadMail.objects.filter(upload=upload, sent_at__isnull=False).count() == 2


# ---------------------------------------------------------------------------------------------
# Once, and never in the way of an upload


def test_a_redelivered_message_sends_the_mail_once(alice_connected, sim, django_capture_on_commit_callbacks):
    upload = pushed(alice_connected, committed=django_capture_on_commit_callbacks)
    event = UploadEvent.objects.get(upload=upload, to_status=Status.READY)
    tasks.mail_upload_event.apply(args=[event.pk])
    tasks.mail_upload_event.apply(args=[event.pk])
    assert len(mail.outbox) == 1
    assert notifications.upload_mail_send(event_id=event.pk) is False


def test_a_mail_another_worker_is_sending_is_left_to_it_until_that_worker_is_presumed_dead(alice_connected, sim):
    upload = received_upload(alice_connected, DATA)
    services.upload_push(upload_id=upload.pk)  # no commit hooks run: nothing sent yet
    event = UploadEvent.objects.get(upload=upload, to_status=Status.READY)
    claim = UploadMail.objects.create(event=event, upload=upload, kind=Status.READY, claimed_at=timezone.now())
    assert notifications.upload_mail_send(event_id=event.pk) is False and not mail.outbox
    UploadMail.objects.filter(pk=claim.pk).update(
        claimed_at=timezone.now() - timedelta(seconds=notifications.CLAIM_SECONDS + 1)
    )
    assert notifications.upload_mail_send(event_id=event.pk) is True and len(mail.outbox) == 1


def test_beat_queues_again_the_mail_whose_message_was_lost(alice_connected, sim):
    upload = received_upload(alice_connected, DATA)
    services.upload_push(upload_id=upload.pk)  # Ready; its message "lost": no commit hooks run
    assert notifications.outcome_mails_lost() == []  # young: its message may still come
    later = timezone.now() + notifications.LOST_MAIL_AFTER + timedelta(seconds=1)
    event = UploadEvent.objects.get(upload=upload, to_status=Status.READY)
    assert notifications.outcome_mails_lost(now=later) == [event.pk]
    Upload.objects.filter(pk=upload.pk).update(status_changed_at=timezone.now() - notifications.LOST_MAIL_AFTER * 2)
    tasks.mail_lost_outcomes.delay()
    assert len(mail.outbox) == 1
    tasks.mail_lost_outcomes.delay()
    assert len(mail.outbox) == 1  # sent: found no more
    # Nor one whose owner turned such mails off, nor one an hour old.
    NotificationSettings.objects.filter(user=alice_connected).update(mail_upload_outcomes=False)
    UploadMail.objects.all().delete()
    assert notifications.outcome_mails_lost(now=later) == []
    NotificationSettings.objects.filter(user=alice_connected).update(mail_upload_outcomes=True)
    assert notifications.outcome_mails_lost(now=later + notifications.LOST_MAIL_WITHIN) == []


def closed_port() -> int:
    """A loopback port nobody listens on: connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_failing_mail_server_changes_nothing_about_the_upload_and_the_mail_follows_later(
    alice_connected, sim, settings, django_capture_on_commit_callbacks
):
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT, settings.EMAIL_TIMEOUT = "127.0.0.1", closed_port(), 2
    upload = pushed(alice_connected, committed=django_capture_on_commit_callbacks)
    assert upload.status == Status.READY and upload.finished_at and not upload.error_message
    fresh = Upload.objects.get(pk=upload.pk)
    assert (fresh.status, fresh.status_changed_at, fresh.error_message) == (Status.READY, upload.status_changed_at, "")
    assert timeline(upload)[-1].startswith("Image ")  # nothing about mail on the upload's timeline
    record = UploadMail.objects.get(upload=upload)
    assert record.sent_at is None and record.claimed_at is None  # released for the retry
    event = record.event
    with pytest.raises(ConnectionRefusedError):
        notifications.upload_mail_send(event_id=event.pk)
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"  # the server is back
    tasks.mail_upload_event.apply(args=[event.pk])
    tasks.mail_upload_event.apply(args=[event.pk])
    assert len(mail.outbox) == 1
    assert Upload.objects.get(pk=upload.pk).status_changed_at == upload.status_changed_at


def test_the_mail_task_retries_a_bounded_number_of_times():
    assert tasks.mail_upload_event.max_retries == tasks.mail_reviewer.max_retries == 6
    assert tasks.mail_upload_event.autoretry_for and tasks.mail_upload_event.retry_backoff


# ---------------------------------------------------------------------------------------------
# Reviewers: batched, four eyes


def test_reviewers_get_one_mail_for_uploads_within_15_minutes_and_another_after(
    alice_connected, carol, dave, sim, review_on, django_capture_on_commit_callbacks
):
    first = pushed(alice_connected, name="first", committed=django_capture_on_commit_callbacks)
    assert sorted(m.to[0] for m in mail.outbox) == ["carol@example.com", "dave@example.com"]
    [to_carol] = mails_to("carol@example.com")
    assert to_carol.subject == "“first” awaits your review"
    assert f"{BASE}/review/{first.uid}/" in to_carol.body and f"{BASE}/review/" in to_carol.body
    second = pushed(alice_connected, name="second", committed=django_capture_on_commit_callbacks)
    assert second.status == Status.AWAITING_REVIEW
    assert len(mail.outbox) == 2  # within 15 minutes: nothing new yet
    tasks.mail_reviewers.delay()  # beat, a minute later
    assert len(mail.outbox) == 2
    # 15 minutes later (the last mail's time moved back): beat sends the news, listing both.
    NotificationSettings.objects.filter(user=carol).update(
        review_mail_sent_at=timezone.now() - notifications.REVIEW_MAIL_WINDOW - timedelta(seconds=1)
    )
    tasks.mail_reviewers.delay()
    [_, again] = mails_to("carol@example.com")
    assert again.subject == "2 uploads await your review"
    assert "“first”" in again.body and "“second”" in again.body
    assert len(mails_to("dave@example.com")) == 1  # dave's window has not passed
    tasks.mail_reviewers.delay()  # and nothing new since: no third mail
    assert len(mails_to("carol@example.com")) == 2


def test_after_the_window_with_nothing_new_no_mail_is_sent(alice_connected, carol, sim, review_on,
                                                          django_capture_on_commit_callbacks):
    upload = pushed(alice_connected, committed=django_capture_on_commit_callbacks)
    # An hour later: the mail told of it then; it still waits, but that is no news.
    Upload.objects.filter(pk=upload.pk).update(status_changed_at=timezone.now() - timedelta(hours=1, minutes=1))
    NotificationSettings.objects.filter(user=carol).update(review_mail_sent_at=timezone.now() - timedelta(hours=1))
    tasks.mail_reviewers.delay()
    assert len(mail.outbox) == 1


def test_a_reviewer_is_not_mailed_about_their_own_upload(carol, dave, sim, review_on, django_capture_on_commit_callbacks):
    connect_cloud(carol)
    upload = pushed(carol, committed=django_capture_on_commit_callbacks)
    assert upload.status == Status.AWAITING_REVIEW
    [message] = mail.outbox
    assert message.to == ["dave@example.com"]
    assert notifications.review_mail_send(user_id=carol.pk) is False
    assert notifications.reviewers_to_mail() == []


def test_a_redelivered_review_message_sends_once(alice_connected, carol, sim, review_on):
    received = received_upload(alice_connected, DATA)
    services.upload_push(upload_id=received.pk)  # awaiting review; no commit hooks run
    tasks.mail_reviewer.apply(args=[carol.pk])
    tasks.mail_reviewer.apply(args=[carol.pk])
    assert len(mail.outbox) == 1


def test_a_long_queue_is_listed_up_to_50_uploads_with_how_many_more(alice, carol):
    Upload.objects.bulk_create(
        Upload(owner=alice, name=f"disk {n:02}", filename=f"disk{n}.raw", disk_format="raw", size=1024**3,
               staged_name=f"s{n}", status=Status.AWAITING_REVIEW)
        for n in range(52)
    )
    tasks.mail_reviewers.delay()
    [message] = mail.outbox
    assert message.subject == "52 uploads await your review"
    assert message.body.count(f"{BASE}/review/") == 51  # 50 uploads and the queue
    assert "“disk 49”" in message.body and "“disk 50”" not in message.body
    assert "… and 2 more." in message.body


def test_people_without_the_permission_or_an_address_get_no_review_mail(
    alice_connected, bob, django_user_model, sim, review_on, django_capture_on_commit_callbacks
):
    no_address = make_reviewer(django_user_model, "erin")
    django_user_model.objects.filter(pk=no_address.pk).update(email="")
    pushed(alice_connected, committed=django_capture_on_commit_callbacks)
    assert mail.outbox == []


# ---------------------------------------------------------------------------------------------
# Turning mails off, the language, the profile page


def test_an_owner_who_turned_outcome_mails_off_gets_none(alice_connected, sim, django_capture_on_commit_callbacks):
    NotificationSettings.objects.create(user=alice_connected, mail_upload_outcomes=False)
    pushed(alice_connected, committed=django_capture_on_commit_callbacks)
    assert mail.outbox == [] and not UploadMail.objects.exists()


def test_a_reviewer_who_turned_review_mails_off_gets_none(alice_connected, carol, dave, sim, review_on,
                                                          django_capture_on_commit_callbacks):
    NotificationSettings.objects.create(user=carol, mail_review_requests=False)
    pushed(alice_connected, committed=django_capture_on_commit_callbacks)
    assert [m.to for m in mail.outbox] == [["dave@example.com"]]


def test_each_mail_is_written_in_its_recipients_language(alice_connected, carol, sim, review_on,
                                                         django_capture_on_commit_callbacks):
    NotificationSettings.objects.create(user=alice_connected, language="de")
    upload = pushed(alice_connected, committed=django_capture_on_commit_callbacks)
    with django_capture_on_commit_callbacks(execute=True):
        review.upload_reject(upload=upload, by=carol, reason="Nein.")
    to_carol, to_alice = mails_to("carol@example.com")[0], mails_to("alice@example.com")[0]
    assert '<html lang="en">' in html_of(to_carol)
    assert '<html lang="de">' in html_of(to_alice)
    assert to_alice.subject.endswith("“ wurde bei der Freigabe abgelehnt")
    assert to_alice.body.startswith("Guten Tag alice,")
    # The error hint was stored in English; the mail says it in German (uploads/i18n.py).
    assert "Das Portal löscht diese Kopie nach 24 Stunden." in to_alice.body


def test_the_profile_page_turns_mails_off_and_sets_the_language(alice_client, alice):
    page = alice_client.get("/profile/").content.decode()
    assert 'href="/profile/" aria-current="page"' in page  # linked in the header
    assert re.search(r'<input type="checkbox" name="mail_upload_outcomes"[^>]* checked>', page)  # on by default
    assert 'name="mail_review_requests"' not in page  # only reviewers have that switch
    assert "alice@example.com" in page
    response = alice_client.post("/profile/", {"language": "de"})
    assert response.status_code == 302 and response["Location"] == "/profile/"
    prefs = NotificationSettings.objects.get(user=alice)
    assert (prefs.mail_upload_outcomes, prefs.mail_review_requests, prefs.language) == (False, True, "de")
    response = alice_client.post("/profile/", {"language": "fr", "mail_upload_outcomes": "on"})
    assert response.status_code == 200 and "Select a valid choice" in response.content.decode()
    assert NotificationSettings.objects.get(user=alice).language == "de"


def test_reviewers_see_and_set_the_review_switch(client, carol):
    client.force_login(carol)
    page = client.get("/profile/").content.decode()
    assert 'name="mail_review_requests"' in page
    client.post("/profile/", {"language": "en", "mail_upload_outcomes": "on"})
    prefs = NotificationSettings.objects.get(user=carol)
    assert (prefs.mail_upload_outcomes, prefs.mail_review_requests) == (True, False)


def test_the_profile_page_needs_a_sign_in(client):
    response = client.get("/profile/")
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")
