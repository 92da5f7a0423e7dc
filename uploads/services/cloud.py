"""The owner's cloud account: connecting, and the token a push, a poll or a discard works with.

The token is looked up and decrypted once per piece of work (`owner_token`); whether it lasts
long enough for a push is a question asked of that one lookup (`why_token_cannot_push`).
"""

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.conf import settings
from django.utils import timezone
from django.utils.translation import gettext_noop

from uploads import crypto
from uploads.ims import IamClient, ImsClient
from uploads.models import CloudAccount, Status, Upload
from uploads.services import dispatch
from uploads.services.state import NO_ERROR, duration, move

# Before any push has been measured: a cautious guess of the speed to IMS (10 MiB/s).
ASSUMED_SEND_RATE = 10 * 1024 * 1024
# IAM tokens live 24 hours: a push that needs longer starts with a token at least this fresh.
LONGEST_TOKEN_WAIT = timedelta(hours=23)
# A token this close to its end is not used to start work: it could expire mid-call.
TOKEN_MARGIN = CloudAccount.USABLE_MARGIN
# How many of the latest pushes the expected send rate is the mean of.
SEND_RATE_SAMPLE = 20

# Why there is no token to work with, in the same words wherever it is asked.
# Stored with an upload's error in English and translated where shown (uploads/i18n.py).
NO_SIGN_IN = gettext_noop("Your cloud sign-in has expired (or was never made).")
UNREADABLE_SIGN_IN = gettext_noop("Your stored cloud sign-in can no longer be read (the portal's key changed).")


@dataclass(frozen=True)
class OwnerToken:
    """The owner's token, looked up and decrypted once. `value` is None when there is none to
    work with, and `why_not` then says why in plain words."""

    value: str | None = field(repr=False)
    expires_at: datetime | None
    why_not: str = ""


def cloud_account_connect(*, user, domain: str, user_name: str, password: str, project: str) -> CloudAccount:
    """Ask IAM for a project-scoped token and keep only the token (encrypted) and its expiry.

    Raises CloudError with a message for the person when IAM refuses. Uploads that waited for a
    new sign-in continue by themselves.
    """
    token = IamClient(settings.IAM_ENDPOINT).get_token(
        domain=domain, user=user_name, password=password, project=project
    )
    account, _ = CloudAccount.objects.update_or_create(
        user=user,
        defaults={
            "domain_name": token.domain_name or domain,
            "user_name": token.user_name or user_name,
            "project_name": token.project_name or project,
            "project_id": token.project_id,
            "token_encrypted": crypto.encrypt(token.value),
            "expires_at": token.expires_at,
        },
    )
    for upload in Upload.objects.filter(owner=user, status=Status.RECONNECT):
        if upload.ims_image_id and upload.send_size and upload.sent_bytes == upload.send_size:
            # IMS has the whole file: go on checking on it rather than sending it again.
            move(upload, Status.PROCESSING, gettext_noop("Cloud account reconnected: checking on the image continues"),
                 next_poll_at=timezone.now(), **NO_ERROR)
        else:
            dispatch.requeue(upload, gettext_noop("Cloud account reconnected: sending continues"))
    return account


def cloud_account_disconnect(*, user) -> None:
    CloudAccount.objects.filter(user=user).delete()


def cloud_account_usable(account: CloudAccount | None) -> bool:
    return account is not None and account.is_usable


def owner_token(user_id: int) -> OwnerToken:
    """The one lookup of a user's token: fetched and decrypted here, nowhere else."""
    account = CloudAccount.objects.filter(user_id=user_id).first()
    if not cloud_account_usable(account):
        return OwnerToken(None, None, NO_SIGN_IN)
    value = crypto.decrypt(account.token_encrypted)
    if value is None:
        return OwnerToken(None, account.expires_at, UNREADABLE_SIGN_IN)
    return OwnerToken(value, account.expires_at)


def ims_client(token: str) -> ImsClient:
    return ImsClient(settings.IMS_ENDPOINT, token)


def expected_send_rate() -> float:
    """Bytes per second that pushes to IMS reached lately (a cautious guess before there are any)."""
    rates = list(
        Upload.objects.filter(status=Status.READY, send_rate__gt=0)
        .order_by("-finished_at")
        .values_list("send_rate", flat=True)[:SEND_RATE_SAMPLE]
    )
    return sum(rates) / len(rates) if rates else ASSUMED_SEND_RATE


def why_token_cannot_push(token: OwnerToken, upload: Upload) -> str:
    """Why `token` cannot be used to send the upload's file (to send: the staged or converted
    copy), or "" when it lasts until the push can have finished. A push that needs longer than
    any token lives (IAM tokens last 24 hours) starts with a fresh one."""
    if token.value is None:
        return gettext_noop("%(why)s The file cannot be sent until you sign in again.") % {"why": token.why_not}
    needed = timedelta(seconds=(upload.send_size or upload.size) / expected_send_rate())
    if token.expires_at < timezone.now() + min(needed, LONGEST_TOKEN_WAIT) + TOKEN_MARGIN:
        return gettext_noop(
            "Your cloud sign-in ends in %(left)s, but sending this file takes about %(needed)s, so it was not started."
        ) % {"left": duration(token.expires_at - timezone.now()), "needed": duration(needed)}
    return ""
