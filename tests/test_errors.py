"""One error base for everything that ends an attempt (uploads/errors.py): the cloud client's
CloudError, the checks' InspectError, FileChanged and refusals (Problem), and a missing staged file
all carry message, hint, code, detail and permanent under the same names."""

import subprocess
import sys

import pytest

from tests.test_pipeline import DATA, received_upload
from uploads import services, staging
from uploads.diskimage import FileChanged
from uploads.errors import InspectError, PortalError, Problem, StagedFileMissing, refusal
from uploads.ims import CloudError
from uploads.models import Status
from uploads.qemu import QemuImgFailed

EVERY_KIND = [
    CloudError("The cloud said no.", code="forbidden", permanent=True, hint="Ask.", status=403, detail="HTTP 403"),
    InspectError("Checking took too long.", hint="Later.", detail="timeout"),
    QemuImgFailed("qemu-img could not read the file.", detail="exit 1"),
    FileChanged("inspector: not a qcow2"),
    refusal("backing_file", "backing file 'base.img'"),
    StagedFileMissing(),
]


@pytest.mark.parametrize("error", EVERY_KIND, ids=lambda e: type(e).__name__)
def test_every_error_that_ends_an_attempt_has_the_same_fields(error):
    assert isinstance(error, PortalError)
    assert error.message and error.hint is not None and error.code and isinstance(error.permanent, bool)
    assert isinstance(error.detail, str)


def test_a_refusal_is_permanent_and_keeps_its_one_click_fix():
    problem = Problem("format_mismatch", "This file is a VMDK disk.", hint="Choose VMDK.", suggested_format="vmdk")
    assert problem.permanent and problem.suggested_format == "vmdk"
    assert refusal("extended_l2", "bit 4").code == "unsafe"  # several reasons share a stored code


def test_a_changed_file_names_the_failed_check_where_it_is_logged():
    error = FileChanged("the file ended after 10 of 20 bytes")
    assert error.code == "file_changed" and error.permanent
    assert "ended after 10 of 20" in str(error) and "ended after" not in error.message


@pytest.mark.parametrize("module", ["uploads.ims", "uploads.errors", "uploads.diskimage", "uploads.qemu"])
def test_the_client_and_the_checks_import_nothing_of_django(module):
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.split('.')[0] == 'django'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_a_staged_file_gone_before_sending_fails_in_plain_words(alice_connected, sim, monkeypatch):
    upload = received_upload(alice_connected, DATA)

    def gone(name, version=None):
        raise FileNotFoundError(name)

    monkeypatch.setattr(staging, "open_for_reading", gone)
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.FAILED and upload.error_code == "missing"
    assert upload.error_message == "The staged copy of your file is missing, so it cannot be sent."
    assert upload.error_hint == "Upload the file again."
