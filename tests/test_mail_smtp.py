"""E-mail through a real SMTP server: aiosmtpd on loopback receives what a real Celery worker sends,
with Django's SMTP backend configured from the environment (EMAIL_HOST, EMAIL_PORT ...) as in
production, when an upload the worker pushed ends Ready."""

import email
import email.policy
import socket

import pytest
from django.db import transaction

from tests.conftest import connect_cloud, wait_for
from tests.test_pipeline import DATA, received_upload
from uploads.models import Status, Upload, UploadMail
from uploads.services import dispatch

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BASE = "https://portal.example.test"


class Inbox:
    """aiosmtpd's handler: keeps every message it accepts."""

    def __init__(self):
        self.messages = []

    async def handle_DATA(self, server, session, envelope):
        self.messages.append(envelope)
        return "250 Message accepted for delivery"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def smtp_server():
    from aiosmtpd.controller import Controller

    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=free_port())
    controller.start()  # returns once the server answers
    inbox.port = controller.port
    yield inbox
    controller.stop()


@pytest.fixture(scope="module")
def worker_environment(smtp_server):
    """The module's worker sends mail to the test SMTP server (conftest's celery_worker_process)."""
    return {
        "EMAIL_HOST": "127.0.0.1", "EMAIL_PORT": str(smtp_server.port), "EMAIL_TIMEOUT": "10",
        "DEFAULT_FROM_EMAIL": "IMS upload portal <portal@example.test>", "PORTAL_BASE_URL": BASE,
    }


def test_the_worker_mails_the_owner_through_smtp_when_an_upload_is_ready(e2e, smtp_server, alice, sim):
    connect_cloud(alice)
    upload = received_upload(alice, DATA, name="smtp disk")
    with transaction.atomic():
        dispatch.enqueue_push(upload.pk)  # the worker gets it once this commits

    def ready_and_mailed():
        upload.refresh_from_db()
        return upload.status == Status.READY and smtp_server.messages

    wait_for(ready_and_mailed, timeout=90, interval=0.2, what="the upload to be Ready and its mail to arrive")
    [envelope] = smtp_server.messages
    assert envelope.mail_from == "portal@example.test" and envelope.rcpt_tos == ["alice@example.com"]
    message = email.message_from_bytes(envelope.original_content, policy=email.policy.default)
    assert message["Subject"] == "“smtp disk” is ready in IMS"
    assert message.get_content_type() == "multipart/alternative"
    text = message.get_body(("plain",)).get_content()
    html = message.get_body(("html",)).get_content()
    link = f"{BASE}/uploads/{upload.uid}/"
    assert upload.ims_image_id in text and link in text and f'href="{link}"' in html
    assert UploadMail.objects.get(upload=upload).sent_at is not None
    assert Upload.objects.get(pk=upload.pk).status == Status.READY
