"""The owner's upload for the live status JSON, found and checked in one database query.

Every open "My uploads" page asks for each unfinished upload's status every few seconds. Django's
usual way costs three database round trips per request (the session, then the user, then the
upload), and with PostgreSQL each one waits for a server process to get a core: on a machine that
is busy receiving and sending images, those waits are most of the request's time. Here the session
row, the upload and its owner come back in one query, and the session is then checked exactly as
`django.contrib.auth.get_user` checks it: same backend, same user id, the same session hash
(so a changed password still signs the session out), an active user, an unexpired session.

Whenever anything is not the plain case (no session cookie, another session engine or
authentication backend, a session that is not the owner's, a hash made with an old secret), the
function returns None and the view goes Django's own way, which gives Django's own answer: the
sign-in page, a 404 for someone else's upload, a session rotated or flushed.
"""

from django.conf import settings
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
from django.contrib.auth.backends import ModelBackend
from django.contrib.sessions.backends.db import SessionStore
from django.contrib.sessions.models import Session
from django.db.models import Subquery
from django.utils import timezone
from django.utils.crypto import constant_time_compare

from uploads.models import Upload

DATABASE_SESSIONS = "django.contrib.sessions.backends.db"
MODEL_BACKEND = f"{ModelBackend.__module__}.{ModelBackend.__qualname__}"


def owned_upload(request, uid) -> Upload | None:
    """The upload `uid` if the request's session is signed in as its owner; None: ask Django."""
    key = request.COOKIES.get(settings.SESSION_COOKIE_NAME)
    if not key or settings.SESSION_ENGINE != DATABASE_SESSIONS or MODEL_BACKEND not in settings.AUTHENTICATION_BACKENDS:
        return None
    session_data = Session.objects.filter(session_key=key, expire_date__gt=timezone.now()).values("session_data")
    found = list(Upload.objects.filter(uid=uid).select_related("owner").annotate(session_data=Subquery(session_data)))
    if not found or found[0].session_data is None:
        return None
    upload = found[0]
    session = SessionStore().decode(upload.session_data)
    owner = upload.owner
    signed_in_as_owner = (
        session.get(BACKEND_SESSION_KEY) == MODEL_BACKEND
        and session.get(SESSION_KEY) == str(owner.pk)
        and ModelBackend().user_can_authenticate(owner)
        and constant_time_compare(session.get(HASH_SESSION_KEY) or "", owner.get_session_auth_hash())
    )
    return upload if signed_in_as_owner else None
