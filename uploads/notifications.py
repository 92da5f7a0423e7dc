"""E-mail: who is told what, and the one way each mail is sent once.

- An upload's owner hears when it ends Ready, Failed, Refused or Rejected, or waits for them to
  reconnect their cloud account: `upload_moved` (called by state.move, the one place every move
  passes) queues `mail_upload_event` once the move is committed; `upload_mail_send` sends it.
- Reviewers hear when uploads await review, at most once per REVIEW_MAIL_WINDOW each: a mail lists
  everything waiting but their own uploads (four eyes). A move to Awaiting review and beat (every
  minute, for the windows that closed since) queue `mail_reviewers`, which queues one
  `mail_reviewer` per reviewer with news; `review_mail_send` sends it.
- A message is only a nudge: beat queues again the owner's mails whose message was lost
  (`outcome_mails_lost`), and the reviewers' come from the database alone.

Mails are sent by Celery tasks, never in a request, and touch no upload: a mail server that is away
delays a mail (the task retries a few times), never an upload. Each mail is claimed with a guarded
update before it is sent and marked sent after, so two workers or a repeated message never send it
twice; a claim whose worker died expires after CLAIM_SECONDS. Each person's NotificationSettings
(the profile page) can turn either kind off, and chooses the language the mails are written in.
Mails carry no token or secret: they say what happened and link to the portal (PORTAL_BASE_URL).
"""

import logging
import smtplib
from datetime import timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.core.mail import EmailMultiAlternatives
from django.db import transaction
from django.db.models import F, Max, Q
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils import timezone, translation
from django.utils.translation import gettext, gettext as _, gettext_noop, ngettext

from uploads import tasks
from uploads.models import NotificationSettings, Status, Upload, UploadEvent, UploadMail

log = logging.getLogger(__name__)

# The moves an owner hears of: each ends what the portal does by itself.
OUTCOMES = {Status.READY, Status.FAILED, Status.REFUSED, Status.REJECTED, Status.RECONNECT}
# A reviewer gets at most one mail about waiting uploads this often.
REVIEW_MAIL_WINDOW = timedelta(minutes=15)
# A claim older than this belongs to a worker that died while sending: another may take it over.
CLAIM_SECONDS = 5 * 60
# What a mail server's trouble looks like: the claim is released, and the task retries (uploads/tasks.py).
MAIL_ERRORS = (smtplib.SMTPException, OSError)
# An outcome's mail whose message was lost is queued again by beat after LOST_MAIL_AFTER, for at
# most LOST_MAIL_WITHIN (mails about older moves would be news no more).
LOST_MAIL_AFTER, LOST_MAIL_WITHIN = timedelta(minutes=2), timedelta(hours=1)
# The longest list of waiting uploads one review mail carries; the queue page has them all.
REVIEW_MAIL_MOST = 50


# ---------------------------------------------------------------------------------------------
# Queueing: after the move is committed, never in its way


def upload_moved(to: str, event_id: int) -> None:
    """The hook state.move calls after every move: queue the mails it calls for, once committed.
    robust: with Redis away the message is lost, never the move (beat queues the mail again)."""
    if to in OUTCOMES:
        transaction.on_commit(lambda: tasks.mail_upload_event.delay(event_id), robust=True)
    elif to == Status.AWAITING_REVIEW:
        transaction.on_commit(lambda: tasks.mail_reviewers.delay(), robust=True)


def preferences(user) -> NotificationSettings:
    """The person's mail settings, made with the defaults (every mail on, English) when first needed."""
    prefs, _created = NotificationSettings.objects.get_or_create(user=user)
    return prefs


def absolute_url(path: str) -> str:
    return f"{settings.PORTAL_BASE_URL}{path}"


def _send(*, to: str, language: str, subject, template: str, context: dict) -> None:
    """Render the mail in the recipient's language (`subject`: a function that says it, called in
    that language), plain text with an HTML alternative, and send it."""
    with translation.override(language):
        context = {**context, "portal_url": absolute_url(reverse("home")), "profile_url": absolute_url(reverse("profile"))}
        text = render_to_string(f"emails/{template}.txt", context)
        html = render_to_string(f"emails/{template}.html", context)
        subject = " ".join(subject().split())  # a header: one line
    message = EmailMultiAlternatives(subject, text, settings.DEFAULT_FROM_EMAIL, [to])
    message.attach_alternative(html, "text/html")
    message.send()


def _unclaimed(now) -> Q:
    """Nobody sends it, or the worker that claimed it died (CLAIM_SECONDS ago)."""
    return Q(claimed_at__isnull=True) | Q(claimed_at__lt=now - timedelta(seconds=CLAIM_SECONDS))


# ---------------------------------------------------------------------------------------------
# An upload's owner


# Marked for translation here, translated when sent, in the recipient's language.
SUBJECTS = {
    Status.READY: gettext_noop("“%(name)s” is ready in IMS"),
    Status.FAILED: gettext_noop("“%(name)s” could not be sent to IMS"),
    Status.REFUSED: gettext_noop("“%(name)s” was refused by the file check"),
    Status.REJECTED: gettext_noop("“%(name)s” was rejected by a reviewer"),
    Status.RECONNECT: gettext_noop("“%(name)s” waits for you to reconnect your cloud account"),
}


def upload_mail_send(*, event_id: int) -> bool:
    """Mail the owner about the move recorded as `event_id`, unless they turned such mails off or
    it was sent already. Returns whether this call sent it. Raises MAIL_ERRORS (the claim
    released) when the mail server did not take it."""
    event = UploadEvent.objects.select_related("upload__owner").filter(pk=event_id).first()
    if event is None or event.to_status not in OUTCOMES:
        return False
    upload, owner = event.upload, event.upload.owner
    if not owner.is_active or not owner.email:
        return False
    prefs = preferences(owner)
    if not prefs.mail_upload_outcomes:
        return False
    mail, _created = UploadMail.objects.get_or_create(event=event, defaults={"upload": upload, "kind": event.to_status})
    now = timezone.now()
    if not UploadMail.objects.filter(_unclaimed(now), pk=mail.pk, sent_at__isnull=True).update(claimed_at=now):
        return False  # sent already, or another worker is sending it
    try:
        _send(
            to=owner.email, language=prefs.language, template="upload_outcome",
            subject=lambda: _(SUBJECTS[event.to_status]) % {"name": upload.name},
            context={
                "kind": event.to_status, "upload": upload, "user": owner, "event": event,
                "upload_url": absolute_url(upload.get_absolute_url()),
                "cloud_url": absolute_url(reverse("cloud_account")),
                "upload_again_url": absolute_url(reverse("upload")),
            },
        )
    except MAIL_ERRORS as exc:
        UploadMail.objects.filter(pk=mail.pk, claimed_at=now).update(claimed_at=None)
        log.warning("upload %s: the %s mail to its owner was not sent: %s", upload.pk, event.to_status, exc)
        raise
    UploadMail.objects.filter(pk=mail.pk, claimed_at=now).update(sent_at=timezone.now())
    log.info("upload %s: %s mail sent to its owner (user %s)", upload.pk, event.to_status, owner.pk)
    return True


def outcome_mails_lost(*, now=None) -> list[int]:
    """Outcomes of the last LOST_MAIL_WITHIN whose mail task never ran (its message was lost, say
    with Redis) and whose owner wants mail: the events to queue again (beat, `mail_lost_outcomes`).
    Those younger than LOST_MAIL_AFTER are left to their message. One the server kept refusing has
    its UploadMail row and stays given up."""
    now = now or timezone.now()
    return list(
        UploadEvent.objects.filter(
            upload__status__in=OUTCOMES, to_status=F("upload__status"), mail__isnull=True,
            upload__status_changed_at__gte=now - LOST_MAIL_WITHIN, upload__status_changed_at__lt=now - LOST_MAIL_AFTER,
            upload__owner__is_active=True,
        )
        .exclude(upload__owner__email="")
        .exclude(upload__owner__notification_settings__mail_upload_outcomes=False)
        .values_list("pk", flat=True)
    )


# ---------------------------------------------------------------------------------------------
# Reviewers


def reviewers():
    """Active people who may approve uploads (permission uploads.review_upload, directly, through
    a group, or as superusers) and have an address to write to."""
    permission = Permission.objects.get(codename="review_upload", content_type__app_label="uploads")
    return (
        get_user_model().objects.filter(is_active=True).exclude(email="")
        .filter(Q(is_superuser=True) | Q(user_permissions=permission) | Q(groups__permissions=permission))
        .distinct()
    )


def _latest_per_owner() -> dict[int, object]:
    """For each person with uploads awaiting review, when the latest of them began to wait: one
    row per owner, however long the queue."""
    return dict(
        Upload.objects.filter(status=Status.AWAITING_REVIEW).order_by()
        .values("owner_id").annotate(latest=Max("status_changed_at")).values_list("owner_id", "latest")
    )


def _has_news(latest: dict[int, object], user_id: int, prefs: NotificationSettings | None, now) -> bool:
    """An upload of someone else began to await review since this reviewer's last mail, and that
    mail is REVIEW_MAIL_WINDOW old."""
    last = prefs.review_mail_sent_at if prefs else None
    if last and last > now - REVIEW_MAIL_WINDOW:
        return False
    return any(owner_id != user_id and (last is None or since > last) for owner_id, since in latest.items())


def reviewers_to_mail() -> list[int]:
    """The reviewers who are due a mail about waiting uploads now (for `mail_reviewers`)."""
    latest = _latest_per_owner()
    if not latest:
        return []
    now = timezone.now()
    prefs = {p.user_id: p for p in NotificationSettings.objects.filter(user__in=reviewers())}
    return [
        user_id for user_id in reviewers().values_list("pk", flat=True)
        if (user_id not in prefs or prefs[user_id].mail_review_requests)
        and _has_news(latest, user_id, prefs.get(user_id), now)
    ]


def review_mail_send(*, user_id: int) -> bool:
    """Mail one reviewer the uploads awaiting review (not their own), if they are due one: news
    since their last mail, which is REVIEW_MAIL_WINDOW old. Returns whether this call sent it.
    Raises MAIL_ERRORS (the claim released) when the mail server did not take it."""
    from uploads import review  # review imports the services, which import this module

    user = reviewers().filter(pk=user_id).first()
    if user is None:
        return False
    prefs = preferences(user)
    if not prefs.mail_review_requests or not _has_news(_latest_per_owner(), user.pk, prefs, timezone.now()):
        return False
    now = timezone.now()
    # The claim: only if nobody else claimed, or sent one, since this row was read.
    claimed = NotificationSettings.objects.filter(
        Q(review_mail_claimed_at__isnull=True) | Q(review_mail_claimed_at__lt=now - timedelta(seconds=CLAIM_SECONDS)),
        pk=prefs.pk, review_mail_sent_at=prefs.review_mail_sent_at,
    ).update(review_mail_claimed_at=now)
    if not claimed:
        return False
    release = NotificationSettings.objects.filter(pk=prefs.pk, review_mail_claimed_at=now)
    queue = review.review_queue().exclude(owner=user)
    count, waiting = queue.count(), list(queue[:REVIEW_MAIL_MOST])  # the queue page has them all
    if not waiting:  # decided on in the meantime: nothing to tell
        release.update(review_mail_claimed_at=None)
        return False
    try:
        _send(
            to=user.email, language=prefs.language, template="review_waiting",
            # One upload is named; several are counted (two texts: a plural form may not name a value
            # its singular does not, or msgfmt refuses the catalogue).
            subject=lambda: (
                gettext("“%(name)s” awaits your review") % {"name": waiting[0].name} if count == 1
                else ngettext("%(count)s upload awaits your review", "%(count)s uploads await your review", count)
                % {"count": count}
            ),
            context={
                "user": user, "count": count, "more": count - len(waiting),
                "uploads": [{"upload": u, "url": absolute_url(reverse("review_page", args=[u.uid]))} for u in waiting],
                "queue_url": absolute_url(reverse("review_queue")),
            },
        )
    except MAIL_ERRORS as exc:
        release.update(review_mail_claimed_at=None)
        log.warning("the review mail to user %s was not sent: %s", user.pk, exc)
        raise
    release.update(review_mail_sent_at=now, review_mail_claimed_at=None)
    log.info("review mail sent to user %s: %s uploads waiting", user.pk, count)
    return True
