"""Celery tasks: thin. Each takes an upload id (never a token), calls a service, and decides
about retrying. The database row guards every step, so a lost or repeated message is harmless.

Services queue these tasks (uploads.services.dispatch imports this module), so each task imports
the services when it runs: the two modules never import each other at load time.

Beat runs exactly once per deployment (one `celery beat` process). Its tasks (poll_due_uploads,
reconcile_uploads, clean_staging) are nevertheless safe to run twice at the same moment: due polls
are leased with a guarded update, a push is claimed by one worker only, and each clean-up is a
guarded move (tests/test_fairness.py keeps them so)."""

from celery import shared_task


@shared_task(bind=True, max_retries=None)
def push_upload(self, upload_id: int) -> None:
    from uploads import services

    outcome = services.upload_push(upload_id=upload_id)
    if outcome.retry_in is not None:
        raise self.retry(countdown=outcome.retry_in)


@shared_task
def poll_upload(upload_id: int) -> None:
    from uploads import services

    services.upload_poll(upload_id=upload_id)


@shared_task
def poll_due_uploads() -> None:
    """Beat: queue a poll for every upload whose next check of IMS is due."""
    from uploads import services

    for upload_id in services.uploads_due_for_poll():
        poll_upload.delay(upload_id)


@shared_task
def reconcile_uploads() -> None:
    """Beat: an upload whose push message got lost, or whose worker died, is queued again."""
    from uploads import services

    for upload_id in services.uploads_to_reconcile():
        push_upload.delay(upload_id)


@shared_task
def clean_staging() -> None:
    """Beat: delete staged copies no upload needs any more."""
    from uploads import services

    services.staging_cleanup()


@shared_task
def discard_upload(upload_id: int) -> None:
    from uploads import services

    services.upload_discard(upload_id=upload_id)


# E-mail (uploads/notifications.py). A mail server that is away delays a mail, never an upload:
# these tasks touch no upload, and retry a few times with growing waits (1, 2, 4 ... minutes,
# about an hour in all) before they give up and log it. Each mail is claimed before it is sent,
# so a repeated message sends nothing.
MAIL_RETRY = {"max_retries": 6, "retry_backoff": 60, "retry_backoff_max": 1800, "retry_jitter": False}


@shared_task(autoretry_for=(Exception,), **MAIL_RETRY)
def mail_upload_event(event_id: int) -> None:
    """Mail an upload's owner about the move recorded as `event_id` (ready, failed ...)."""
    from uploads import notifications

    notifications.upload_mail_send(event_id=event_id)


@shared_task
def mail_lost_outcomes() -> None:
    """Beat: queue again the owner's mails whose message got lost."""
    from uploads import notifications

    for event_id in notifications.outcome_mails_lost():
        mail_upload_event.delay(event_id)


@shared_task
def mail_reviewers() -> None:
    """After a move to Awaiting review, and from beat: one task per reviewer who is due a mail."""
    from uploads import notifications

    for user_id in notifications.reviewers_to_mail():
        mail_reviewer.delay(user_id)


@shared_task(autoretry_for=(Exception,), **MAIL_RETRY)
def mail_reviewer(user_id: int) -> None:
    from uploads import notifications

    notifications.review_mail_send(user_id=user_id)
