"""Review: with UPLOAD_REVIEW_REQUIRED (or for members of UPLOAD_REVIEW_GROUPS) a checked file
waits for a reviewer before anything reaches IMS; reviewers approve or reject it with a reason,
never their own, one decision wins, and every decision is on the timeline."""

import html
import json
import os
from datetime import timedelta

import pytest
from django.contrib.auth.models import Group, Permission
from django.utils import timezone

from tests.test_pipeline import DATA, received_upload, timeline
from uploads import fairness, ims, review, services, staging
from uploads.models import ALLOWED_MOVES, WAITING_ON, Status, Upload, UploadEvent, can_move


@pytest.fixture
def review_on(settings):
    settings.UPLOAD_REVIEW_REQUIRED = True
    return settings


def make_reviewer(django_user_model, name: str):
    user = django_user_model.objects.create_user(name, f"{name}@example.com", f"{name}-pw-1234")
    user.user_permissions.add(Permission.objects.get(codename="review_upload"))
    return django_user_model.objects.get(pk=user.pk)  # a fresh copy: permissions are cached


@pytest.fixture
def carol(django_user_model):
    return make_reviewer(django_user_model, "carol")


@pytest.fixture
def dave(django_user_model):
    return make_reviewer(django_user_model, "dave")


def awaiting_upload(owner, data=DATA, name="web-server") -> Upload:
    upload = received_upload(owner, data, name=name)
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.AWAITING_REVIEW, timeline(upload)
    return upload


def ims_calls(sim) -> list:
    return [r for r in sim.requests_seen() if r["path"].startswith("/v2")]


def unchanged(upload: Upload) -> bool:
    """The row and its timeline are as they were when `upload` was read."""
    fresh = Upload.objects.get(pk=upload.pk)
    return (fresh.status, fresh.review_decision, fresh.reviewed_by_id, fresh.status_changed_at) == (
        upload.status, upload.review_decision, upload.reviewed_by_id, upload.status_changed_at
    )


# ---------------------------------------------------------------------------------------------
# The state machine


def test_awaiting_review_and_rejected_are_states_with_their_own_moves():
    assert (Status.AWAITING_REVIEW.label, Status.REJECTED.label) == ("Awaiting review", "Rejected")
    assert can_move(Status.CHECKING, Status.AWAITING_REVIEW) and can_move(Status.CONVERTING, Status.AWAITING_REVIEW)
    assert ALLOWED_MOVES[Status.AWAITING_REVIEW] == {Status.RECEIVED, Status.REJECTED, Status.CANCELLED}
    assert ALLOWED_MOVES[Status.REJECTED] == {Status.CANCELLED}  # never sent; Remove only
    assert not can_move(Status.AWAITING_REVIEW, Status.PUSHING)
    assert not can_move(Status.RECEIVED, Status.AWAITING_REVIEW)
    assert WAITING_ON[Status.AWAITING_REVIEW] == "reviewer" and WAITING_ON[Status.REJECTED] == "person"


# ---------------------------------------------------------------------------------------------
# Who needs approval


def test_without_the_setting_a_checked_file_goes_straight_to_ims(alice_connected, sim):
    upload = received_upload(alice_connected, DATA)
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.READY


def test_with_the_setting_a_checked_file_awaits_review_and_nothing_reaches_ims(review_on, alice_connected, sim):
    upload = awaiting_upload(alice_connected)
    assert ims_calls(sim) == [] and upload.ims_image_id == ""
    assert upload.detected_format == "raw" and upload.inspection["checks"]  # it was checked first
    assert upload.checked_file == review.fingerprint(upload) and upload.checked_file[upload.staged_name]
    assert timeline(upload)[-1] == "The file passed the check; waiting for a reviewer to approve it"


def test_members_of_a_review_group_need_approval_even_when_the_setting_is_off(settings, alice_connected, bob, sim):
    settings.UPLOAD_REVIEW_GROUPS = ["trainees"]
    Group.objects.create(name="trainees").user_set.add(alice_connected)
    awaiting_upload(alice_connected)
    settings.UPLOAD_REVIEW_GROUPS = ["someone-else"]
    upload = received_upload(alice_connected, DATA, name="second")
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.READY


# ---------------------------------------------------------------------------------------------
# Approve


def test_approval_queues_the_push_which_sends_without_checking_again(
    review_on, alice_connected, carol, sim, task_queue, monkeypatch
):
    upload = awaiting_upload(alice_connected)
    task_queue.clear()
    review.upload_approve(upload=upload, by=carol)
    upload.refresh_from_db()
    assert upload.status == Status.RECEIVED and task_queue == [("push", upload.pk)]
    assert (upload.review_decision, upload.reviewed_by, upload.reviewed_at is not None) == ("approved", carol, True)
    event = upload.events.filter(to_status=Status.RECEIVED).last()
    assert event.message == "Approved by carol" and event.from_status == Status.AWAITING_REVIEW and event.at

    def no_second_check(*args, **kwargs):
        raise AssertionError("the approved file was checked again")

    monkeypatch.setattr(services.push, "check_file", no_second_check)
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.READY, timeline(upload)
    assert "Approved, and the file is unchanged since its check: sent without checking again" in timeline(upload)


def test_nobody_approves_or_rejects_their_own_upload(review_on, alice_connected, sim, django_user_model):
    alice_connected.user_permissions.add(Permission.objects.get(codename="review_upload"))
    alice = django_user_model.objects.get(pk=alice_connected.pk)
    upload = awaiting_upload(alice)
    events = upload.events.count()
    with pytest.raises(review.ReviewError, match="your own upload"):
        review.upload_approve(upload=upload, by=alice)
    with pytest.raises(review.ReviewError, match="your own upload"):
        review.upload_reject(upload=upload, by=alice, reason="I changed my mind")
    assert unchanged(upload) and upload.events.count() == events


def test_only_reviewers_decide(review_on, alice_connected, bob, sim):
    upload = awaiting_upload(alice_connected)
    with pytest.raises(review.ReviewError, match="Only reviewers"):
        review.upload_approve(upload=upload, by=bob)
    assert unchanged(upload)


def test_a_file_that_changed_since_its_check_is_not_approved(review_on, alice_connected, carol, sim, task_queue):
    upload = awaiting_upload(alice_connected)
    task_queue.clear()
    events = upload.events.count()
    with open(staging.path(upload.staged_name), "r+b") as staged:  # same size, other bytes
        staged.seek(1000)
        staged.write(b"tampered")
    with pytest.raises(review.ReviewError, match="changed after it was checked"):
        review.upload_approve(upload=upload, by=carol)
    assert unchanged(upload) and upload.events.count() == events and task_queue == []


def test_a_file_replaced_since_its_check_is_not_approved(review_on, alice_connected, carol, sim, task_queue):
    upload = awaiting_upload(alice_connected)
    task_queue.clear()
    path = staging.path(upload.staged_name)
    stat = os.stat(path)
    replacement = path + ".new"
    with open(replacement, "wb") as new:
        new.write(DATA)
    os.replace(replacement, path)  # same bytes, same size: another file all the same
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(review.ReviewError, match="changed after it was checked"):
        review.upload_approve(upload=upload, by=carol)
    assert unchanged(upload) and task_queue == []


def test_an_object_rewritten_since_its_check_is_not_approved(
    review_on, object_staging, alice_connected, carol, sim, task_queue
):
    upload = awaiting_upload(alice_connected)
    task_queue.clear()
    tampered = DATA[:1000] + b"tampered" + DATA[1008:]  # same size, other bytes
    object_staging.client().put_object(Bucket=object_staging.bucket,
                                       Key=object_staging.prefix + upload.staged_name, Body=tampered)
    with pytest.raises(review.ReviewError, match="changed after it was checked"):
        review.upload_approve(upload=upload, by=carol)
    assert unchanged(upload) and task_queue == []


def test_a_file_changed_after_approval_is_checked_again_and_awaits_review_again(
    review_on, alice_connected, carol, sim, task_queue
):
    upload = awaiting_upload(alice_connected)
    review.upload_approve(upload=upload, by=carol)
    with open(staging.path(upload.staged_name), "ab") as staged:
        staged.write(b"more")
    Upload.objects.filter(pk=upload.pk).update(size=len(DATA) + 4)
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.AWAITING_REVIEW and upload.review_decision == "" and ims_calls(sim) == []


# ---------------------------------------------------------------------------------------------
# Reject


def test_rejection_needs_a_reason(review_on, alice_connected, carol, sim):
    upload = awaiting_upload(alice_connected)
    events = upload.events.count()
    for reason in ["", "   ", "\n\t"]:
        with pytest.raises(review.ReviewError, match="Write why"):
            review.upload_reject(upload=upload, by=carol, reason=reason)
    with pytest.raises(review.ReviewError, match="keep it under"):
        review.upload_reject(upload=upload, by=carol, reason="x" * (review.REASON_MAX_LENGTH + 1))
    assert unchanged(upload) and upload.events.count() == events


def test_rejection_tells_the_owner_why_and_what_to_do(review_on, alice_connected, carol, sim, client):
    upload = awaiting_upload(alice_connected)
    review.upload_reject(upload=upload, by=carol, reason="The image has no cloud-init.")
    upload.refresh_from_db()
    assert upload.status == Status.REJECTED and upload.review_reason == "The image has no cloud-init."
    assert upload.events.last().message == "Rejected by carol: The image has no cloud-init."
    client.force_login(alice_connected)
    data = client.get(f"/uploads/{upload.uid}/status").json()
    assert data["status"] == "rejected" and data["status_label"] == "Rejected"
    assert "The image has no cloud-init." in data["error_message"] and "upload the fixed file" in data["error_hint"]
    assert data["needs_action"] and data["stopped"] and not data["final"] and data["waiting_on"] == "person"
    assert data["primary_action"]["kind"] == "upload_again" and data["primary_action"]["url"] == "/upload/"
    assert [a["kind"] for a in data["actions"]] == ["upload_again", "remove"]
    page = client.get(f"/uploads/{upload.uid}/").content.decode()
    assert "The image has no cloud-init." in page and "Upload a fixed file" in page
    assert ims_calls(sim) == []


def test_the_owner_sees_awaiting_review_and_may_cancel(review_on, alice_connected, sim, client, task_queue):
    upload = awaiting_upload(alice_connected)
    client.force_login(alice_connected)
    data = client.get(f"/uploads/{upload.uid}/status").json()
    assert data["status_label"] == "Awaiting review" and data["waiting_on"] == "reviewer"
    assert not data["needs_action"] and not data["final"] and data["primary_action"] is None
    assert "waiting for a reviewer" in data["detail"]
    assert [a["kind"] for a in data["actions"]] == ["cancel"]
    client.post(f"/uploads/{upload.uid}/cancel")
    upload.refresh_from_db()
    assert upload.status == Status.CANCELLED


# ---------------------------------------------------------------------------------------------
# Two reviewers at once


def test_of_two_reviewers_deciding_at_once_one_wins_the_other_is_told(
    review_on, alice_connected, carol, dave, sim, task_queue
):
    upload = awaiting_upload(alice_connected)
    task_queue.clear()
    carols_copy, daves_copy = Upload.objects.get(pk=upload.pk), Upload.objects.get(pk=upload.pk)
    review.upload_approve(upload=carols_copy, by=carol)
    events = upload.events.count()
    with pytest.raises(review.ReviewError, match="already approved by carol"):
        review.upload_approve(upload=daves_copy, by=dave)  # read before carol's decision
    with pytest.raises(review.ReviewError, match="already approved by carol"):
        review.upload_reject(upload=Upload.objects.get(pk=upload.pk), by=dave, reason="no")
    fresh = Upload.objects.get(pk=upload.pk)
    assert (fresh.status, fresh.reviewed_by) == (Status.RECEIVED, carol) and upload.events.count() == events
    assert task_queue == [("push", upload.pk)]  # one push, not two


def test_approving_a_rejected_upload_says_who_rejected_it(review_on, alice_connected, carol, dave, sim, task_queue):
    upload = awaiting_upload(alice_connected)
    task_queue.clear()
    stale = Upload.objects.get(pk=upload.pk)
    review.upload_reject(upload=upload, by=carol, reason="Wrong OS version")
    with pytest.raises(review.ReviewError, match="already rejected by carol"):
        review.upload_approve(upload=stale, by=dave)
    assert Upload.objects.get(pk=upload.pk).status == Status.REJECTED and task_queue == []


def test_approving_an_upload_its_owner_cancelled_says_so(review_on, alice_connected, carol, sim, task_queue):
    upload = awaiting_upload(alice_connected)
    stale = Upload.objects.get(pk=upload.pk)
    services.upload_cancel(upload=upload, by="alice")
    with pytest.raises(review.ReviewError, match="no longer awaits review .it is now “Cancelled”."):
        review.upload_approve(upload=stale, by=carol)
    assert Upload.objects.get(pk=upload.pk).status == Status.CANCELLED


# ---------------------------------------------------------------------------------------------
# The reconciler, redelivered messages, clean-up, limits


def test_neither_the_reconciler_nor_a_redelivered_message_pushes_an_upload_awaiting_or_rejected(
    review_on, alice_connected, carol, sim, task_queue
):
    waiting = awaiting_upload(alice_connected, name="waiting")
    rejected = awaiting_upload(alice_connected, name="rejected")
    review.upload_reject(upload=rejected, by=carol, reason="No")
    long_ago = timezone.now() - timedelta(days=2)
    Upload.objects.update(status_changed_at=long_ago, heartbeat_at=long_ago)  # as if a worker died long ago
    assert services.uploads_to_reconcile() == []
    for upload in (waiting, rejected):
        services.upload_push(upload_id=upload.pk)  # the message again, late
        assert Upload.objects.get(pk=upload.pk).status == upload.status
    assert ims_calls(sim) == []


def test_uploads_awaiting_review_or_rejected_hold_no_push_slot(review_on, settings, alice_connected, carol, sim):
    settings.PUSH_CONCURRENCY_PER_USER = 1
    waiting = awaiting_upload(alice_connected, name="waiting")
    review.upload_reject(upload=awaiting_upload(alice_connected, name="rejected"), by=carol, reason="No")
    assert not fairness.current_load().by_owner
    assert Upload.objects.get(pk=waiting.pk).heartbeat_at is None
    settings.UPLOAD_REVIEW_REQUIRED = False
    assert pushed_now(received_upload(alice_connected, DATA, name="third")).status == Status.READY


def pushed_now(upload: Upload) -> Upload:
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    return upload


def test_a_rejected_file_is_deleted_after_the_retention(review_on, settings, alice_connected, carol, sim):
    upload = awaiting_upload(alice_connected)
    review.upload_reject(upload=upload, by=carol, reason="No")
    services.staging_cleanup()
    assert staging.exists(upload.staged_name)
    Upload.objects.filter(pk=upload.pk).update(
        status_changed_at=timezone.now() - timedelta(hours=settings.STAGING_RETENTION_HOURS + 1)
    )
    services.staging_cleanup()
    assert not staging.exists(upload.staged_name) and Upload.objects.get(pk=upload.pk).staged_deleted_at


def test_uploads_awaiting_review_count_toward_the_per_person_limit(review_on, settings, alice_connected, sim):
    awaiting_upload(alice_connected)
    settings.UPLOAD_MAX_UNFINISHED_PER_USER = 1
    with pytest.raises(services.UploadLimitReached):
        received_upload(alice_connected, DATA, name="another")


def test_my_uploads_counts_and_filters_awaiting_and_rejected(review_on, alice_connected, carol, sim, client):
    awaiting_upload(alice_connected, name="waiting-one")
    review.upload_reject(upload=awaiting_upload(alice_connected, name="rejected-one"), by=carol, reason="No")
    client.force_login(alice_connected)
    page = client.get("/uploads/").content.decode()
    assert "1 awaiting review" in page and "1 rejected" in page and "0 failed" in page
    waiting = client.get("/uploads/?state=awaiting_review").content.decode()
    assert "waiting-one" in waiting and "rejected-one" not in waiting
    assert "rejected-one" in client.get("/uploads/?state=rejected").content.decode()


# ---------------------------------------------------------------------------------------------
# The review queue


def test_the_queue_is_for_reviewers_only(alice_client, client):
    assert alice_client.get("/review/").status_code == 403
    assert alice_client.get(f"/review/{Upload().uid}/").status_code == 403
    assert alice_client.post("/review/decide", {"decision": "approve"}).status_code == 403
    client.logout()
    assert client.get("/review/").status_code == 302


def test_the_queue_lists_uploads_awaiting_review_oldest_first_with_what_to_judge(
    review_on, alice_connected, carol, sim, client
):
    old = awaiting_upload(alice_connected, name="older-image")
    new = awaiting_upload(alice_connected, name="newer-image")
    Upload.objects.filter(pk=old.pk).update(status_changed_at=timezone.now() - timedelta(hours=1))
    client.force_login(carol)
    page = client.get("/review/").content.decode()
    assert page.index("older-image") < page.index("newer-image")
    assert "alice" in page and "293 KB" in page and "RAW" in page and "older-image.raw" in page
    assert f'value="{new.uid}"' in page  # a checkbox for each
    assert 'data-review-link' in page and ">2</span>" in page  # the header's link with the count


def test_the_header_links_the_queue_for_reviewers_only(alice_client):
    assert "data-review-link" not in alice_client.get("/uploads/").content.decode()


def test_the_queue_needs_few_queries_however_many_uploads_wait(
    review_on, alice_connected, bob, carol, sim, client, django_assert_max_num_queries
):
    for number in range(30):
        owner = alice_connected if number % 2 else bob
        Upload.objects.create(owner=owner, name=f"image-{number}", filename=f"image-{number}.raw", disk_format="raw",
                              size=1024, status=Status.AWAITING_REVIEW, staged_name=f"x{number}",
                              inspection={"checks": {"backing file": "none"}})
    client.force_login(carol)
    client.get("/review/")  # the session, permissions and the like once
    with django_assert_max_num_queries(10):  # 9 today: session, user, perms, counts, one page
        response = client.get("/review/")
    assert response.content.decode().count("data-review-row") == 25 and "Page 1 of 2" in response.content.decode()


def test_several_uploads_are_approved_at_once_from_the_queue(
    review_on, alice_connected, carol, sim, client, task_queue
):
    first = awaiting_upload(alice_connected, name="first")
    second = awaiting_upload(alice_connected, name="second")
    task_queue.clear()
    client.force_login(carol)
    response = client.post("/review/decide", {"uid": [str(first.uid), str(second.uid)], "decision": "approve"},
                           follow=True)
    assert "Approved 2 uploads" in response.content.decode()
    assert set(Upload.objects.values_list("status", flat=True)) == {Status.RECEIVED}
    assert sorted(task_queue) == sorted([("push", first.pk), ("push", second.pk)])


def test_rejecting_several_without_a_reason_changes_none(review_on, alice_connected, carol, sim, client):
    first = awaiting_upload(alice_connected, name="first")
    second = awaiting_upload(alice_connected, name="second")
    client.force_login(carol)
    response = client.post("/review/decide", {"uid": [str(first.uid), str(second.uid)], "decision": "reject",
                                              "reason": " "}, follow=True)
    assert "Write why" in response.content.decode()
    assert set(Upload.objects.values_list("status", flat=True)) == {Status.AWAITING_REVIEW}


def test_a_decision_without_any_upload_ticked_says_so(review_on, carol, client):
    client.force_login(carol)
    response = client.post("/review/decide", {"decision": "approve", "uid": ["not-a-uuid"]}, follow=True)
    assert "Tick at least one upload" in response.content.decode()


# ---------------------------------------------------------------------------------------------
# The review page


def test_the_review_page_shows_the_exact_ims_request_built_by_the_ims_client(
    review_on, alice_connected, carol, sim, client, monkeypatch, task_queue
):
    real = ims.image_create_body

    def marked(**kwargs):
        return {**real(**kwargs), "portal_marker": "one-builder"}

    monkeypatch.setattr(ims, "image_create_body", marked)
    upload = awaiting_upload(alice_connected)
    client.force_login(carol)
    page = client.get(f"/review/{upload.uid}/").content.decode()
    shown = page.split("data-ims-body", 1)[1].split(">", 1)[1].split("</pre>", 1)[0]
    body = json.loads(html.unescape(shown))
    assert body == marked(name="web-server", disk_format="raw", os_version="Ubuntu 22.04 server 64bit",
                          min_disk=1, min_ram=512, tags=["env=test"])
    review.upload_approve(upload=upload, by=carol)
    services.upload_push(upload_id=upload.pk)
    [image] = sim.images()
    assert image["name"] == body["name"]
    created = [r for r in sim.requests_seen() if r["method"] == "POST" and r["path"] == "/v2/images"]
    assert len(created) == 1


def test_the_review_page_shows_the_check_the_sums_the_owner_and_the_timeline(
    review_on, alice_connected, carol, sim, client, task_queue
):
    upload = awaiting_upload(alice_connected)
    client.force_login(carol)
    page = client.get(f"/review/{upload.uid}/").content.decode()
    assert "Awaiting review" in page and "alice" in page and "293 KB" in page
    for name in upload.inspection["checks"]:
        assert name in page
    assert "The file passed the check; waiting for a reviewer to approve it" in page
    assert "Approve and send to IMS" in page and 'name="reason"' in page
    review.upload_approve(upload=upload, by=carol)
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    page = client.get(f"/review/{upload.uid}/").content.decode()
    assert upload.md5 in page and upload.sha512 in page and "Approved by carol" in page
    assert "Approve and send to IMS" not in page  # decided: no more decision buttons


def test_the_review_page_offers_retry_and_cancel_that_fit_the_state(
    review_on, alice_connected, carol, sim, client, task_queue
):
    upload = awaiting_upload(alice_connected)
    client.force_login(carol)
    page = client.get(f"/review/{upload.uid}/").content.decode()
    # Awaiting review, a reviewer's no is a rejection with its reason, not a cancel.
    assert f"/review/{upload.uid}/cancel" not in page and f"/review/{upload.uid}/retry" not in page
    Upload.objects.filter(pk=upload.pk).update(status=Status.FAILED, error_message="IMS was away")
    page = client.get(f"/review/{upload.uid}/").content.decode()
    assert f"/review/{upload.uid}/retry" in page and f"/review/{upload.uid}/cancel" in page and "Remove" in page
    client.post(f"/review/{upload.uid}/retry")
    assert Upload.objects.get(pk=upload.pk).status == Status.RECEIVED
    assert "Retry requested by carol" in timeline(upload)


def test_a_single_decision_from_the_review_page_comes_back_to_it(review_on, alice_connected, carol, sim, client):
    upload = awaiting_upload(alice_connected)
    client.force_login(carol)
    response = client.post("/review/decide", {"uid": str(upload.uid), "next_uid": str(upload.uid),
                                              "decision": "reject", "reason": "Wrong image"})
    assert response["Location"] == f"/review/{upload.uid}/"
    assert UploadEvent.objects.filter(upload=upload, message="Rejected by carol: Wrong image").exists()


def test_a_reviewer_deletes_a_ready_image_from_ims(review_on, alice_connected, carol, sim, client, task_queue):
    upload = awaiting_upload(alice_connected)
    review.upload_approve(upload=upload, by=carol)
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    image_id = upload.ims_image_id
    client.force_login(carol)
    assert f"/review/{upload.uid}/delete-image" in client.get(f"/review/{upload.uid}/").content.decode()
    response = client.post(f"/review/{upload.uid}/delete-image", follow=True)
    assert f"Image {image_id} was deleted from IMS." in response.content.decode()
    upload.refresh_from_db()
    assert (upload.status, upload.ims_image_id, upload.ims_status) == (Status.READY, "", "deleted")
    assert sim.images() == [] and f"Image {image_id} deleted from IMS by carol" in timeline(upload)
    with pytest.raises(review.ReviewError, match="Only the image of a ready upload"):
        review.upload_delete_image(upload=upload, by=carol)  # nothing left to delete


def test_deleting_an_image_needs_the_owners_sign_in(review_on, alice_connected, carol, sim, task_queue):
    upload = awaiting_upload(alice_connected)
    review.upload_approve(upload=upload, by=carol)
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    alice_connected.cloud_account.delete()
    with pytest.raises(review.ReviewError, match="sign-in of alice has expired"):
        review.upload_delete_image(upload=upload, by=carol)
    assert Upload.objects.get(pk=upload.pk).ims_image_id == upload.ims_image_id and len(sim.images()) == 1


def test_a_reviewer_cannot_cancel_an_upload_awaiting_review_past_the_reason(
    review_on, alice_connected, carol, sim, client, task_queue
):
    upload = awaiting_upload(alice_connected)
    client.force_login(carol)
    response = client.post(f"/review/{upload.uid}/cancel", follow=True)
    assert "reject it with a reason instead" in response.content.decode()
    assert unchanged(upload) and Upload.objects.get(pk=upload.pk).status == Status.AWAITING_REVIEW


def test_approving_while_the_staged_file_cannot_be_read_says_so_and_changes_nothing(
    review_on, alice_connected, carol, sim, client, monkeypatch, task_queue
):
    upload = awaiting_upload(alice_connected)
    task_queue.clear()

    def unavailable(name):
        raise staging.StagingUnavailable("The object storage does not answer.")

    monkeypatch.setattr(staging, "version", unavailable)
    client.force_login(carol)
    response = client.post("/review/decide", {"uid": str(upload.uid), "decision": "approve"}, follow=True)
    assert response.status_code == 200
    assert "cannot be read just now" in response.content.decode()
    assert unchanged(upload) and task_queue == []


def test_the_review_page_says_when_ims_imports_the_file_from_obs(
    review_on, alice_connected, carol, sim, client, monkeypatch, task_queue
):
    from uploads import obs_import

    upload = awaiting_upload(alice_connected)
    client.force_login(carol)
    assert "The exact body of POST /v2/images" in client.get(f"/review/{upload.uid}/").content.decode()
    monkeypatch.setattr(obs_import, "applies", lambda upload: True)
    page = client.get(f"/review/{upload.uid}/").content.decode()
    assert "POST /v2/cloudimages/action" in page and "The exact body of POST /v2/images" not in page
