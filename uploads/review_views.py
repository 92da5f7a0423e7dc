"""The reviewers' pages: the queue of uploads awaiting review, and the review page of one upload.
Thin, like views.py: read the request, call uploads.review (or services), render."""

import json
import uuid

from django.contrib import messages
from django.contrib.auth.decorators import login_required, permission_required
from django.core.paginator import Paginator
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils.translation import gettext as _, ngettext
from django.views.decorators.http import require_POST

from uploads import obs_import, review, services
from uploads import ims
from uploads.models import Status, Upload

REVIEW_QUEUE_PER_PAGE = 25


def reviewer_only(view):
    """Signed-in reviewers only: others are sent to sign in, or get 403 when signed in."""
    return login_required(permission_required(review.PERMISSION, raise_exception=True)(view))


@reviewer_only
def review_queue(request):
    page = Paginator(review.review_queue(), REVIEW_QUEUE_PER_PAGE).get_page(request.GET.get("page"))
    return render(request, "uploads/review_queue.html", {
        "page": page, "uploads": page.object_list, "reason_max_length": review.REASON_MAX_LENGTH,
    })


def ims_request_body(upload: Upload) -> dict:
    """Exactly what the push sends as POST /v2/images (ImsClient.create_image builds the same)."""
    return ims.image_create_body(
        name=upload.name, disk_format=upload.send_format or upload.disk_format, os_version=upload.os_version,
        min_disk=upload.min_disk, min_ram=upload.min_ram, tags=upload.tags,
    )


@reviewer_only
def review_page(request, uid):
    upload = get_object_or_404(Upload.objects.select_related("owner", "owner__cloud_account", "reviewed_by"), uid=uid)
    return render(request, "uploads/review_page.html", {
        "upload": upload,
        "events": upload.events.all(),
        "obs_import": obs_import.applies(upload),
        "ims_body": json.dumps(ims_request_body(upload), indent=2, ensure_ascii=False),
        "checks": (upload.inspection or {}).get("checks", {}),
        "may_decide": upload.status == Status.AWAITING_REVIEW and upload.owner_id != request.user.pk,
        "own_upload": upload.owner_id == request.user.pk,
        "reason_max_length": review.REASON_MAX_LENGTH,
    })


def _back(request):
    """Back to the review page a single decision came from, else to the queue."""
    uid = _valid_uids([request.POST.get("next_uid", "")])
    return redirect(reverse("review_page", args=uid) if uid else "review_queue")


@reviewer_only
@require_POST
def review_decide(request):
    """Approve or reject one upload or several at once (the queue's checkboxes): each is decided
    on its own, so one that another reviewer decided first does not stop the others."""
    decision = request.POST.get("decision", "")
    uids = request.POST.getlist("uid")
    if decision not in {"approve", "reject"}:
        messages.error(request, _("Choose Approve or Reject."))
        return _back(request)
    uploads = list(Upload.objects.filter(uid__in=_valid_uids(uids)).select_related("owner", "reviewed_by"))
    if not uploads:
        messages.error(request, _("Tick at least one upload first; nothing was changed."))
        return _back(request)
    done = []
    for upload in sorted(uploads, key=lambda u: u.status_changed_at):
        try:
            if decision == "approve":
                review.upload_approve(upload=upload, by=request.user)
            else:
                review.upload_reject(upload=upload, by=request.user, reason=request.POST.get("reason", ""))
        except review.ReviewError as exc:
            messages.error(request, str(exc))
        else:
            done.append(f"“{upload.name}”")
    if done:
        text = (ngettext("Approved %(count)d upload: %(names)s. It is being sent to IMS.",
                         "Approved %(count)d uploads: %(names)s. They are being sent to IMS.", len(done))
                if decision == "approve" else
                ngettext("Rejected %(count)d upload: %(names)s. Its owner sees your reason.",
                         "Rejected %(count)d uploads: %(names)s. Their owners see your reason.", len(done)))
        messages.success(request, text % {"count": len(done), "names": ", ".join(done)})
    return _back(request)


def _valid_uids(uids: list[str]) -> list[str]:
    valid = []
    for uid in uids:
        try:
            valid.append(str(uuid.UUID(uid)))
        except ValueError:
            continue
    return valid


@reviewer_only
@require_POST
def review_retry(request, uid):
    upload = get_object_or_404(Upload, uid=uid)
    try:
        services.upload_retry(upload=upload, by=request.user.get_username())
    except services.ServiceError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, _("“%(name)s” will be sent again.") % {"name": upload.name})
    return redirect("review_page", uid=upload.uid)


@reviewer_only
@require_POST
def review_cancel(request, uid):
    upload = get_object_or_404(Upload, uid=uid)
    if upload.status == Status.AWAITING_REVIEW:  # a reviewer's no is a rejection, with its reason
        messages.error(request, _("“%(name)s” awaits review: reject it with a reason instead, so that its owner "
                                  "knows what to fix. Nothing was changed.") % {"name": upload.name})
        return redirect("review_page", uid=upload.uid)
    try:
        deletes = services.upload_cancel(upload=upload, by=request.user.get_username())
    except services.ServiceError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, _("“%(name)s” was cancelled; the portal deletes %(what)s.")
                         % {"name": upload.name, "what": deletes or _("nothing more")})
    return redirect("review_page", uid=upload.uid)


@reviewer_only
@require_POST
def review_delete_image(request, uid):
    upload = get_object_or_404(Upload, uid=uid)
    image_id = upload.ims_image_id
    try:
        review.upload_delete_image(upload=upload, by=request.user)
    except review.ReviewError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, _("Image %(image)s was deleted from IMS.") % {"image": image_id})
    return redirect("review_page", uid=upload.uid)
