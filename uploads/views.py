"""Pages and the live status JSON. Thin: read the request, call a service, render."""

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_POST
from django.views.decorators.vary import vary_on_cookie

from uploads import services, status_access
from uploads.forms import COMMON_OS_VERSIONS, CloudAccountForm, UploadMetadataForm
from uploads.ims import ImsError
from uploads.models import EXTENSION_FORMATS, CloudAccount, DiskFormat, Status, Upload


def cloud_account_context(request: HttpRequest) -> dict:
    """Every page knows whether the cloud account is usable and how many uploads wait for it."""
    if not getattr(request, "user", None) or not request.user.is_authenticated:
        return {}
    account = CloudAccount.objects.filter(user=request.user).first()
    return {
        "cloud_account": account,
        "cloud_connected": services.cloud_account_usable(account),
        "waiting_for_reconnect": Upload.objects.filter(owner=request.user, status=Status.RECONNECT).count(),
    }


@login_required
def home(request):
    return redirect("upload")


# What the upload page says about a file whose upload the portal ended while the page was
# still sending it (or wanted to continue it): it stops there and never starts the file again
# by itself. static/js/upload.js picks the sentence from the upload's live status.
UPLOAD_PAGE_WORDS = {
    "cancelled": "Cancelled on My uploads: nothing more is sent.",
    "failed": "The portal stopped this upload:",
    "removed": "This upload is no longer in the portal.",
    "elsewhere": "This file already reached the portal from another page; follow it on My uploads.",
    "checking": "Stopped; asking the portal why…",
    "start_again": "To upload the file again from the start, press Retry; or remove it from the list.",
    "add_again": "To upload it again, remove it from the list and add it again.",
    "applied": "{fields}: set for each file in the list ({count}).",
    "nothing_to_apply": "Fill in at least one of the fields above, then press Apply to all files.",
    "no_files": "Add files first; then these details go to each of them.",
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
            "words": UPLOAD_PAGE_WORDS,
        },
    )


@login_required
def my_uploads(request):
    uploads = Upload.objects.filter(owner=request.user)
    return render(request, "uploads/my_uploads.html", {"uploads": uploads})


def _own_upload(request, uid) -> Upload:
    return get_object_or_404(Upload, uid=uid, owner=request.user)


@login_required
def upload_detail(request, uid):
    upload = _own_upload(request, uid)
    return render(request, "uploads/detail.html", {"upload": upload, "events": upload.events.all()})


def status_json(upload: Upload) -> dict:
    return {
        "id": str(upload.uid),
        "name": upload.name,
        "status": upload.status,
        "status_label": upload.get_status_display(),
        "size": upload.size,
        "received_bytes": upload.received_bytes,
        "sent_bytes": upload.sent_bytes,
        "send_rate": round(upload.send_rate),
        "eta_seconds": upload.eta_seconds,
        "progress_percent": upload.progress_percent,
        "send_size": upload.send_size or upload.size,
        "convert_percent": upload.convert_percent,
        "detected_format": upload.detected_format,
        "suggested_format": services.upload_suggested_format(upload),
        "ims_status": upload.ims_status,
        "ims_image_id": upload.ims_image_id,
        "attempt": upload.attempt,
        "retry_at": upload.retry_at.isoformat() if upload.retry_at else None,
        "error_message": upload.error_message,
        "error_hint": upload.error_hint,
        "finished": upload.is_finished,
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


@login_required
@require_POST
def upload_retry(request, uid):
    upload = _own_upload(request, uid)
    try:
        services.upload_retry(upload=upload, by=request.user.get_username())
    except services.ServiceError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"“{upload.name}” will be sent again.")
    return _back(request, upload)


@login_required
@require_POST
def upload_use_format(request, uid):
    upload = _own_upload(request, uid)
    try:
        services.upload_use_format(upload=upload, disk_format=request.POST.get("disk_format", ""),
                                   by=request.user.get_username())
    except services.ServiceError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"“{upload.name}” will be sent as {upload.disk_format.upper()}.")
    return _back(request, upload)


@login_required
@require_POST
def upload_cancel(request, uid):
    upload = _own_upload(request, uid)
    try:
        services.upload_cancel(upload=upload, by=request.user.get_username())
    except services.ServiceError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"“{upload.name}” was cancelled; its staged file and cloud image are removed.")
    return _back(request, upload)


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
        except ImsError as exc:
            form.add_error(None, f"{exc.message} {exc.hint}".strip())
        else:
            messages.success(request, "Your cloud account is connected.")
            return redirect(next_url or "cloud_account")
    return render(request, "uploads/cloud_account.html", {"form": form, "next_url": next_url})


@login_required
@require_POST
def cloud_disconnect(request):
    services.cloud_account_disconnect(user=request.user)
    messages.success(request, "Your cloud account was disconnected and its token deleted.")
    return redirect("cloud_account")
