"""The size limits of a file (under UPLOAD_MAX_BYTES, not empty) and the words that say them,
written once: the tus server and the form use them, and the pages get them through the template
(the footer, the upload page's help and its JSON script elements for static/js/upload.js).
"""

from django.conf import settings
from django.utils.translation import gettext, gettext_lazy

from uploads.i18n import local_size


def max_file_size() -> str:
    """The size every file must stay under, in words ("128 GB"): UPLOAD_MAX_BYTES is one byte less."""
    return local_size(settings.UPLOAD_MAX_BYTES + 1)


def too_large(file_name: str = "") -> str:
    """Why a file is refused for its size; about `file_name` when given (a placeholder will do)."""
    if file_name:
        return gettext("“%(file)s” is %(size)s or larger; IMS takes only smaller images.") % {
            "file": file_name, "size": max_file_size()}
    return gettext("The file is %(size)s or larger; IMS takes only smaller images.") % {"size": max_file_size()}


EMPTY_FILE = gettext_lazy("The file is empty: choose the disk image file itself.")


def page_words() -> dict:
    """The upload page's words about the size limit, for static/js/upload.js."""
    return {
        "too_large": too_large(),
        "too_large_file": too_large("%{file}"),  # Uppy fills in %{file}
        "empty_file": str(EMPTY_FILE),
        "size_note": gettext("Disk images smaller than %(size)s each. Check the details of each file in the list "
                             "below.") % {"size": max_file_size()},
    }


def limits_context(request) -> dict:
    """Every page (the footer) says the size limit."""
    return {"max_file_size": max_file_size()}
