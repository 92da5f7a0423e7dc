"""Pages and the live status JSON. Thin: read the request, call a service, render."""

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.db.models import Count, Q
from django.http import HttpRequest, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils.http import url_has_allowed_host_and_scheme
from django.utils.translation import gettext, gettext_lazy as _
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_POST
from django.views.decorators.vary import vary_on_cookie

from uploads import fairness, limits, notifications, review, services, status_access
from uploads.forms import COMMON_OS_VERSIONS, CloudAccountForm, NotificationSettingsForm, UploadMetadataForm
from uploads.i18n import stored_text
from uploads.ims import CloudError
from uploads.models import EXTENSION_FORMATS, CloudAccount, DiskFormat, Status, Upload


def cloud_account_context(request: HttpRequest) -> dict:
    """Every page knows whether the cloud account is usable and how many uploads wait for it."""
    if not getattr(request, "user", None) or not request.user.is_authenticated:
        return {}
    account = CloudAccount.objects.filter(user=request.user).first()
    return {
        "cloud_account": account,
        "cloud_connected": account is not None and account.is_usable,
        "waiting_for_reconnect": Upload.objects.filter(owner=request.user, status=Status.RECONNECT).count(),
        # The header's link to the review queue, with how many wait (reviewers only).
        "review_count": review.review_count() if review.is_reviewer(request.user) else None,
    }


@login_required
def home(request):
    return redirect("upload")


# What the upload page says about a file whose upload the portal ended while the page was
# still sending it (or wanted to continue it): it stops there and never starts the file again
# by itself. static/js/upload.js picks the sentence from the upload's live status.
UPLOAD_PAGE_WORDS = {
    "cancelled": _("Cancelled on My uploads: nothing more is sent."),
    "failed": _("The portal stopped this upload:"),
    "removed": _("This upload is no longer in the portal."),
    "elsewhere": _("This file already reached the portal from another page; follow it on My uploads."),
    "checking": _("Stopped; asking the portal why…"),
    "start_again": _("To upload the file again from the start, press Retry; or remove it from the list."),
    "add_again": _("To upload it again, remove it from the list and add it again."),
    # upload.js fills in {fields} and {count}.
    "applied": _("{fields}: set for each file in the list ({count})."),
    "nothing_to_apply": _("Fill in at least one of the fields above, then press Apply to all files."),
    "no_files": _("Add files first; then these details go to each of them."),
    # A file sent on to IMS while the browser still sends it (services/early_push.py).
    "sent_to_ims": _("{percent}% sent on to IMS"),
}


def _upload_limits() -> dict:
    """The limits the tus server checks the details against, for the page's fields."""
    fields = UploadMetadataForm.base_fields
    return {
        "image_name": {"max_length": fields["image_name"].max_length},
        "os_version": {"max_length": fields["os_version"].max_length},
        "min_disk": {"min": fields["min_disk"].min_value, "max": fields["min_disk"].max_value},
        "min_ram": {"min": fields["min_ram"].min_value, "max": fields["min_ram"].max_value},
        "tags": {"max_length": fields["tags"].max_length},
        "max_bytes": settings.UPLOAD_MAX_BYTES,
    }


@login_required
def upload_page(request):
    return render(
        request,
        "uploads/upload.html",
        {
            "os_versions": COMMON_OS_VERSIONS,
            "disk_formats": DiskFormat.choices,
            "extension_formats": {ext: fmt.value for ext, fmt in EXTENSION_FORMATS.items()},
            "limits": _upload_limits(),
            "words": {**UPLOAD_PAGE_WORDS, **limits.page_words()},
        },
    )


# My uploads shows this many a page: one page of every upload grows with each upload made, without end.
MY_UPLOADS_PER_PAGE = 25
IN_PROGRESS = [Status.RECEIVING, Status.SENDING_EARLY, Status.RECEIVED, Status.CHECKING, Status.CONVERTING, Status.PUSHING,
               Status.PROCESSING]
# The states My uploads can be filtered by (?state=…), in the order of its summary line. "Failed"
# also takes any stopped state not named here, so that every upload is counted in one of them.
UPLOAD_GROUPS = {
    "in_progress": (_("In progress"), Q(status__in=IN_PROGRESS)),
    "ready": (Status.READY.label, Q(status=Status.READY)),
    "failed": (Status.FAILED.label, ~Q(status__in=[*IN_PROGRESS, Status.READY, Status.REFUSED, Status.RECONNECT,
                                                    Status.CANCELLED, Status.AWAITING_REVIEW, Status.REJECTED])),
    "awaiting_review": (Status.AWAITING_REVIEW.label, Q(status=Status.AWAITING_REVIEW)),
    "refused": (Status.REFUSED.label, Q(status=Status.REFUSED)),  # not a failure: the check refused the file
    "rejected": (Status.REJECTED.label, Q(status=Status.REJECTED)),  # a reviewer said no (uploads/review.py)
    "reconnect": (Status.RECONNECT.label, Q(status=Status.RECONNECT)),
    "cancelled": (Status.CANCELLED.label, Q(status=Status.CANCELLED)),
}


@login_required
def my_uploads(request):
    mine = Upload.objects.filter(owner=request.user)
    # The summary line: every group counted in one query.
    counts = mine.aggregate(all=Count("pk"), **{key: Count("pk", filter=q) for key, (_, q) in UPLOAD_GROUPS.items()})
    state = request.GET.get("state", "")
    if state not in UPLOAD_GROUPS:
        state = ""  # an unknown filter shows everything rather than an error
    shown = mine.filter(UPLOAD_GROUPS[state][1]) if state else mine
    shown = shown.order_by("-created_at", "-pk")  # a total order: pages never repeat or skip one
    page = Paginator(shown, MY_UPLOADS_PER_PAGE).get_page(request.GET.get("page"))
    groups = [{"key": key, "label": label, "count": counts[key]} for key, (label, _) in UPLOAD_GROUPS.items()]
    return render(request, "uploads/my_uploads.html", {
        "page": page,
        "uploads": page.object_list,
        "total": counts["all"],
        "groups": groups,
        # The summary line names in progress, ready and failed always, the others when there are some.
        "summary": [group for index, group in enumerate(groups) if index < 3 or group["count"]],
        "state": state,
        "state_label": UPLOAD_GROUPS[state][0] if state else "",
    })


def _own_upload(request, uid) -> Upload:
    return get_object_or_404(Upload, uid=uid, owner=request.user)


@login_required
def upload_detail(request, uid):
    upload = _own_upload(request, uid)
    return render(request, "uploads/detail.html", {"upload": upload, "events": upload.events.all()})


def status_json(upload: Upload) -> dict:
    """The live status of one upload, as /uploads/<uid>/status answers it (polled by progress.js).

    What it is: `id` (the upload's uid), `name`, `status` (a models.Status value) and
    `status_label` (its words), `detail` (one line that says where it stands, as the page
    writes it; "Waiting to send: 3 uploads ahead of yours" while every push slot it may use is
    taken, see uploads/fairness.py). Sizes in bytes: `size` (the file), `received_bytes`, `send_size` (what is sent:
    the file or its QCOW2 conversion), `sent_bytes`, `send_rate` (bytes/s), `eta_seconds` (or
    null), `progress_percent` (of the current phase), `convert_percent`; `receive_percent` and
    `send_percent` (browser -> portal and portal -> IMS), and `both_hops`, true while the file is
    sent on to IMS as it arrives ("sending_early", services/early_push.py): the page then shows
    both bars. What the check found:
    `detected_format`, `send_format`, `virtual_size` (or null), `min_disk` (GB). IMS:
    `ims_image_id`, `ims_status`, `md5`, `sha512` (of what was sent), `staged_sha512` (of the
    file as uploaded). `attempt`, `retry_at` (ISO time or null), `finished_at` (or null).
    `details_version` changes whenever the upload's own page would show other details or
    timeline lines (progress.js then fetches them).
    Why it stopped and what to do: `error_message`, `error_hint` (plain words; empty while all
    is well); `stopped` is true for failed, refused and rejected uploads (the page shows an error, not a
    warning); `active` is true while the browser, a worker or IMS moves it on (the bar moves).

    Whether to ask again:
    - `final`: true when nothing will ever change (ready, cancelled): stop asking.
    - `needs_action`: true when nothing changes until a person acts (failed, refused,
      rejected, reconnect needed); `primary_action` is then what the page offers first.
    - `finished`: `final` or `needs_action`: nothing changes without a person.
    - `waiting_on`: "browser" (the rest of the file), "portal", "ims", "reviewer" (awaiting review:
      see uploads/review.py), "person", or null when final.

    What a person can do: `actions`, a list of {"kind", "label", "url", "primary"} with kind
    "use_format" (plus "format": send the same file again as that format), "retry",
    "reconnect" and "upload_again" (pages, not forms; "upload_again" after a reviewer rejected
    it, whose reason is the `error_message`), "remove" or "cancel" (plus "confirm": the question
    to ask first); `primary_action` is the one marked primary, or null. `suggested_format`,
    `can_retry` and `can_cancel` say the same for older clients.
    """
    return {**_status_progress(upload), **_status_results(upload), **_status_next_steps(upload)}


def _status_progress(upload: Upload) -> dict:
    """status_json: what the upload is and how far along."""
    return {
        "id": str(upload.uid),
        "name": upload.name,
        "status": upload.status,
        "status_label": upload.get_status_display(),
        # While every push slot it may use is taken: "Waiting to send: 3 uploads ahead of yours".
        "detail": fairness.waiting_text(upload) or upload.phase_detail,
        "size": upload.size,
        "received_bytes": upload.received_bytes,
        "sent_bytes": upload.sent_bytes,
        "send_rate": round(upload.send_rate),
        "eta_seconds": upload.eta_seconds,
        "progress_percent": upload.progress_percent,
        # Both hops, each 0-100: browser -> portal and portal -> IMS. While an upload is sent
        # early (status "sending_early") both move at once and `both_hops` is true.
        "receive_percent": int(upload.received_bytes * 100 / upload.size) if upload.size else 0,
        "send_percent": upload.send_percent,
        "both_hops": upload.status == Status.SENDING_EARLY,
        "send_size": upload.send_size or upload.size,
        "convert_percent": upload.convert_percent,
        "active": upload.is_active,
    }


def _status_results(upload: Upload) -> dict:
    """status_json: what the check and IMS found, and why it stopped."""
    return {
        "detected_format": upload.detected_format,
        "send_format": upload.send_format,
        "virtual_size": upload.virtual_size,
        "min_disk": upload.min_disk,
        "ims_status": upload.ims_status,
        "ims_image_id": upload.ims_image_id,
        "md5": upload.md5,
        "sha512": upload.sha512,
        "staged_sha512": upload.staged_sha512,
        "attempt": upload.attempt,
        "retry_at": upload.retry_at.isoformat() if upload.retry_at else None,
        "finished_at": upload.finished_at.isoformat() if upload.finished_at else None,
        "details_version": upload.details_version,
        # In the person's language (stored in English: uploads/i18n.py).
        "error_message": upload.error_message_text,
        "error_hint": upload.error_hint_text,
        "stopped": upload.is_stopped,
    }


def _status_next_steps(upload: Upload) -> dict:
    """status_json: whether to ask again, and what a person can do."""
    actions = upload.actions()
    return {
        "final": upload.is_finished,
        "needs_action": upload.waits_for_a_person,
        "finished": upload.is_finished or upload.waits_for_a_person,
        "waiting_on": upload.waiting_on,
        "actions": actions,
        "primary_action": next((action for action in actions if action["primary"]), None),
        "suggested_format": upload.suggested_format,
        "can_retry": upload.can_retry,
        "can_cancel": upload.can_cancel,
    }


@never_cache
@vary_on_cookie
def upload_status(request, uid):
    # Polled by every open page: one query in the usual case (see status_access.py).
    upload = status_access.owned_upload(request, uid)
    if upload is None:
        return _upload_status_checked_by_django(request, uid)
    return JsonResponse(status_json(upload))


@login_required
def _upload_status_checked_by_django(request, uid):
    return JsonResponse(status_json(_own_upload(request, uid)))


def _back(request, upload: Upload):
    """Back to the page the button was on: the upload's own page or the list."""
    return redirect(upload if request.POST.get("next") == "detail" else "my_uploads")


def _act_on_upload(request, uid, action, done):
    """A button on one of the owner's uploads: `action(upload, by)` calls the service, and
    `done(upload, result)` says what happened; a ServiceError's words are shown instead."""
    upload = _own_upload(request, uid)
    try:
        result = action(upload, request.user.get_username())
    except services.ServiceError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, done(upload, result))
    return _back(request, upload)


@login_required
@require_POST
def upload_retry(request, uid):
    return _act_on_upload(
        request, uid,
        lambda upload, by: services.upload_retry(upload=upload, by=by),
        lambda upload, result: gettext("“%(name)s” will be sent again.") % {"name": upload.name},
    )


@login_required
@require_POST
def upload_use_format(request, uid):
    return _act_on_upload(
        request, uid,
        lambda upload, by: services.upload_use_format(
            upload=upload, disk_format=request.POST.get("disk_format", ""), by=by),
        lambda upload, result: gettext("“%(name)s” will be sent as %(format)s.") % {
            "name": upload.name, "format": upload.disk_format.upper()},
    )


@login_required
@require_POST
def upload_cancel(request, uid):
    def cancel(upload, by):
        removed = upload.is_stopped  # as it was before the cancel
        return removed, services.upload_cancel(upload=upload, by=by)

    def done(upload, result):
        removed, deletes = result
        if deletes:
            text = (gettext("“%(name)s” was removed: the portal deletes %(deletes)s.") if removed
                    else gettext("“%(name)s” was cancelled: the portal deletes %(deletes)s."))
        else:
            text = (gettext("“%(name)s” was removed: the portal kept nothing of it.") if removed
                    else gettext("“%(name)s” was cancelled: the portal kept nothing of it."))
        return text % {"name": upload.name, "deletes": deletes}

    return _act_on_upload(request, uid, cancel, done)


def _safe_next(request: HttpRequest) -> str:
    """The page to go back to after connecting (`next`, from the link or the form), or "".

    Only a path on this site counts: a full address, even one to this host, or anything a
    browser could read as another site ("//evil.example", "/\\evil.example") is ignored, so
    a link to the Cloud account page can never send someone elsewhere after they signed in.
    """
    target = request.POST.get("next") or request.GET.get("next") or ""
    if target.startswith("/") and url_has_allowed_host_and_scheme(
        target, allowed_hosts=None, require_https=request.is_secure()
    ):
        return target
    return ""


@login_required
def cloud_account(request):
    account = CloudAccount.objects.filter(user=request.user).first()
    next_url = _safe_next(request)
    form = CloudAccountForm.for_account(account, request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            services.cloud_account_connect(user=request.user, **form.cleaned_data)
        except CloudError as exc:
            form.add_error(None, f"{stored_text(exc.message)} {stored_text(exc.hint)}".strip())
        else:
            messages.success(request, gettext("Your cloud account is connected."))
            return redirect(next_url or "cloud_account")
    return render(request, "uploads/cloud_account.html", {"form": form, "next_url": next_url})


@login_required
@require_POST
def cloud_disconnect(request):
    services.cloud_account_disconnect(user=request.user)
    messages.success(request, gettext("Your cloud account was disconnected and its token deleted."))
    return redirect("cloud_account")


@login_required
def profile(request):
    """Which e-mails the person gets (uploads/notifications.py) and in which language."""
    form = NotificationSettingsForm(
        request.POST or None, instance=notifications.preferences(request.user), reviewer=review.is_reviewer(request.user)
    )
    if request.method == "POST" and form.is_valid():
        form.save()
        messages.success(request, gettext("Your e-mail settings are saved."))
        return redirect("profile")
    return render(request, "uploads/profile.html", {"form": form})
