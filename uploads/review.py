"""Review: an upload that passed the file check waits for a reviewer before anything goes to IMS.

Who needs it: everybody when UPLOAD_REVIEW_REQUIRED is on, and members of the groups named in
UPLOAD_REVIEW_GROUPS always. Reviewers hold the permission `uploads.review_upload`.

The push (services/push.py) checks the file, then `upload_hold_for_review` moves it to
AWAITING_REVIEW and stops, recording what the checked file looked like (`fingerprint`). A
reviewer approves (AWAITING_REVIEW -> RECEIVED, the push is queued and skips the check while the
file is unchanged: `approved_and_unchanged`) or rejects with a reason (-> REJECTED). Every
decision is one guarded move, so of two reviewers deciding at once one wins and the other is
told who decided first; each is a timeline line with who, when and why.
"""

from datetime import timezone as dt_timezone

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db.models import QuerySet
from django.utils import formats, timezone
from django.utils.translation import gettext as _, gettext_noop

from uploads import ims, staging
from uploads.i18n import stored_text
from uploads.services import cloud, dispatch, state  # state.move: the one guarded move
from uploads.models import Status, Upload

PERMISSION = "uploads.review_upload"
# A reason is for a person to read and act on: a paragraph, not a document.
REASON_MAX_LENGTH = 2000


class ReviewError(state.ServiceError):
    """A decision that cannot be taken; the message says why, for the reviewer."""


def is_reviewer(user) -> bool:
    return bool(user and user.is_authenticated and user.has_perm(PERMISSION))


def review_needed(upload: Upload) -> bool:
    """Whether this upload must be approved before it is sent to IMS."""
    if settings.UPLOAD_REVIEW_REQUIRED:
        return True
    groups = settings.UPLOAD_REVIEW_GROUPS
    return bool(groups) and get_user_model().objects.filter(pk=upload.owner_id, groups__name__in=groups).exists()


def fingerprint(upload: Upload) -> dict:
    """What the files the check saw look like now (staging.version of the staged file and of its
    conversion): any write or replacement changes it, in a folder or in object storage."""
    return {name: staging.version(name) for name in filter(None, [upload.staged_name, upload.converted_name])}


def approved_and_unchanged(upload: Upload) -> bool:
    """Approved, and the files are those that were checked: the push need not check them again."""
    return upload.review_decision == "approved" and bool(upload.checked_file) and (
        fingerprint(upload) == upload.checked_file
    )


def upload_hold_for_review(*, upload: Upload, attempt: int) -> bool:
    """After a passed check: True when the push must stop here, because the upload now waits for
    a reviewer (or was cancelled in the meantime)."""
    if not review_needed(upload):
        return False
    state.move(
        upload, Status.AWAITING_REVIEW, gettext_noop("The file passed the check; waiting for a reviewer to approve it"),
        on_attempt=attempt, checked_file=fingerprint(upload), review_decision="", reviewed_by=None,
        reviewed_at=None, review_reason="", heartbeat_at=None,
    )
    return True


def review_queue() -> QuerySet:
    """Uploads awaiting review, the longest waiting first, with what the queue page shows."""
    return (
        Upload.objects.filter(status=Status.AWAITING_REVIEW)
        .select_related("owner", "owner__cloud_account")
        .order_by("status_changed_at", "pk")
    )


def review_count() -> int:
    return Upload.objects.filter(status=Status.AWAITING_REVIEW).count()


def _name(user) -> str:
    return user.get_full_name() or user.get_username()


def _check_may_decide(upload: Upload, by) -> None:
    if not is_reviewer(by):
        raise ReviewError(_("Only reviewers can approve or reject uploads."))
    if upload.owner_id == by.pk:
        raise ReviewError(
            _("You cannot approve or reject your own upload “%(name)s”: another reviewer has to decide on it.")
            % {"name": upload.name}
        )


def _date_and_time(moment) -> dict:
    """A moment in UTC as {"date", "time"}: the date in the reader's language (Django's DATE_FORMAT:
    "Nov. 30, 2026", "30. November 2026"), so that a decision of an earlier day never reads as today's."""
    moment = moment.astimezone(dt_timezone.utc)
    return {"date": formats.date_format(moment, "DATE_FORMAT"), "time": moment.strftime("%H:%M:%S")}


def _not_awaiting(upload: Upload) -> ReviewError:
    """Why a decision came too late, from the row as it is now."""
    upload.refresh_from_db()
    if upload.review_decision and upload.reviewed_by_id:
        words = {"approved": _("approved"), "rejected": _("rejected")}[upload.review_decision]
        return ReviewError(
            _("“%(name)s” was already %(decision)s by %(who)s on %(date)s at %(time)s UTC; your decision was not "
              "applied.") % {
                "name": upload.name, "decision": words, "who": _name(upload.reviewed_by), **_date_and_time(upload.reviewed_at),
            }
        )
    return ReviewError(
        _("“%(name)s” no longer awaits review (it is now “%(status)s”); nothing was changed.")
        % {"name": upload.name, "status": upload.get_status_display()}
    )


def upload_approve(*, upload: Upload, by) -> None:
    """Approve an upload awaiting review: the push starts, without checking the file again."""
    _check_may_decide(upload, by)
    if upload.status != Status.AWAITING_REVIEW:
        raise _not_awaiting(upload)
    try:
        unchanged = fingerprint(upload) == upload.checked_file
    except staging.StagingUnavailable:
        raise ReviewError(
            _("The staged file of “%(name)s” cannot be read just now, so it could not be compared with the "
              "file that was checked. It was not approved: try again in a few minutes.") % {"name": upload.name}
        ) from None
    if not unchanged:
        raise ReviewError(
            _("The file of “%(name)s” changed after it was checked, so it is not the file you reviewed. It was "
              "not approved: reject it and ask %(owner)s to upload the file again.")
            % {"name": upload.name, "owner": _name(upload.owner)}
        )
    if not state.move(
        # Stored words are English, translated where shown (uploads/i18n.py); the same below.
        upload, Status.RECEIVED, gettext_noop("Approved by %(who)s") % {"who": _name(by)},
        review_decision="approved", reviewed_by=by, reviewed_at=timezone.now(), review_reason="",
        requeued_at_attempt=upload.attempt, retry_at=None, **state.NO_ERROR,
    ):
        raise _not_awaiting(upload)
    dispatch.enqueue_push(upload.pk)


def upload_reject(*, upload: Upload, by, reason: str) -> None:
    """Reject an upload awaiting review: it is never sent; the owner sees the reason."""
    _check_may_decide(upload, by)
    reason = " ".join((reason or "").split())
    if not reason:
        raise ReviewError(
            _("Write why “%(name)s” is rejected: its owner needs the reason to fix the file. Nothing was changed.")
            % {"name": upload.name}
        )
    if len(reason) > REASON_MAX_LENGTH:
        raise ReviewError(
            _("The reason is %(length)s characters long; keep it under %(most)s. Nothing was changed.")
            % {"length": len(reason), "most": REASON_MAX_LENGTH}
        )
    if upload.status != Status.AWAITING_REVIEW:
        raise _not_awaiting(upload)
    hours = settings.STAGING_RETENTION_HOURS
    if not state.move(
        upload, Status.REJECTED, gettext_noop("Rejected by %(who)s: %(reason)s") % {"who": _name(by), "reason": reason},
        review_decision="rejected", reviewed_by=by, reviewed_at=timezone.now(), review_reason=reason,
        error_message=gettext_noop("A reviewer (%(who)s) rejected this upload: %(reason)s")
        % {"who": _name(by), "reason": reason},
        error_hint=gettext_noop("It was not sent to IMS. Fix what the reviewer asks for, then upload the fixed file "
                                "again. The portal deletes this copy after %(hours)g hours.") % {"hours": hours},
        error_code="rejected",
    ):
        raise _not_awaiting(upload)


def upload_delete_image(*, upload: Upload, by) -> None:
    """A reviewer takes a ready image out of IMS (with its owner's sign-in). The upload stays
    Ready, as the file did reach IMS; its timeline and its page say who deleted the image."""
    if not is_reviewer(by):
        raise ReviewError(_("Only reviewers can delete images from IMS."))
    if upload.status != Status.READY or not upload.ims_image_id:
        raise ReviewError(
            _("Only the image of a ready upload is deleted here; to stop “%(name)s”, cancel it (that deletes "
              "its image too).") % {"name": upload.name}
        )
    token = cloud.owner_token(upload.owner_id).value
    if token is None:
        raise ReviewError(
            _("The cloud sign-in of %(owner)s has expired, so the portal cannot delete the image for them. "
              "Ask them to reconnect, or delete image %(image)s in the cloud console.")
            % {"owner": _name(upload.owner), "image": upload.ims_image_id}
        )
    image_id = upload.ims_image_id
    try:
        cloud.ims_client(token).delete_image(image_id)
    except ims.CloudError as exc:
        state.note(upload, gettext_noop("Could not delete IMS image %(image)s: %(error)s")
                   % {"image": image_id, "error": exc.message}, exc.detail)
        raise ReviewError(_("IMS did not delete the image: %(why)s Nothing was changed.") % {
            "why": stored_text(exc.message)})
    values = {"image": image_id, "who": _name(by)}
    if Upload.objects.filter(pk=upload.pk, ims_image_id=image_id).update(
        ims_image_id="", ims_status="deleted", error_hint="",
        error_message=gettext_noop("Image %(image)s deleted from IMS by %(who)s.") % values,
    ):
        state.note(upload, gettext_noop("Image %(image)s deleted from IMS by %(who)s") % values)
    upload.refresh_from_db()
