"""Every upload, for reviewers: the filters of the All uploads page, what each row says (the reason
an upload stopped, how far it got) and the same list as CSV.

The page (overview_views.all_uploads) and its CSV export (overview_views.all_uploads_csv) read the
same GET form through `filtered`, so the export holds exactly the rows the page lists.
"""

import csv
from collections.abc import Iterator
from datetime import date, datetime, time, timedelta
from types import SimpleNamespace

from django import forms
from django.contrib.auth import get_user_model
from django.db.models import Q, QuerySet
from django.utils import timezone
from django.utils.translation import gettext, gettext_lazy as _, pgettext_lazy

from uploads.models import RECEIVING_STATES, DiskFormat, ErrorCode, Status, Upload
from uploads.sizes import human_size

# The states whose row carries a reason in words (Upload.error_message): why it stopped, or what
# it waits for.
REASON_STATES = (Status.FAILED, Status.REFUSED, Status.REJECTED, Status.RECONNECT)

# A short name for each reason code (Upload.error_code), for the filter, the dashboard and the CSV.
# Codes not listed (a new one, or one IMS made) are shown as they are.
REASON_LABELS = {
    ErrorCode.EXPIRED: _("Upload not finished in time"),
    ErrorCode.TOKEN_EXPIRED: _("Cloud sign-in expired"),
    ErrorCode.AUTH: _("Cloud sign-in refused"),
    ErrorCode.ABORTED: _("Sending was stopped"),
    ErrorCode.NOT_FOUND: _("Image gone from IMS"),
    ErrorCode.FORMAT_MISMATCH: _("Another format than chosen"),
    ErrorCode.FILE_CHANGED: _("File changed after the check"),
    ErrorCode.CHECK_FAILED: _("The check could not run"),
    ErrorCode.CHECKSUM_MISMATCH: _("IMS stored other bytes"),
    ErrorCode.UNVERIFIABLE: _("What IMS stored cannot be verified"),
    ErrorCode.ABANDONED: _("Worker died on the last attempt"),
    ErrorCode.TIMED_OUT: _("Sending took too long"),
    ErrorCode.INTERNAL: _("Fault of the portal"),
    ErrorCode.MISSING: _("Staged copy missing"),
    "network": _("Cloud not reachable"),
    "server": _("Error of the cloud"),
    "forbidden": _("Not allowed in the cloud project"),
    "conflict": _("Image busy in IMS"),
    "too_large": _("Too large for IMS"),
    "unsupported": _("Format not supported"),
    "bad_request": _("IMS refused the details"),
    "staging_unavailable": _("Staging not reachable"),
    "no_scratch_room": _("No room to check or convert"),
    "backing_file": _("Needs another disk (backing file)"),
    "data_file": _("Data kept in other files"),
    "unsafe": _("Unsafe features"),
    "truncated": _("File incomplete"),
    "corrupt": _("File damaged"),
    "ambiguous": _("Looks like several formats"),
    "empty": _("Empty file"),
    "rejected": _("Rejected by a reviewer"),
    "ims_killed": _("IMS gave up on the image"),
    "ims_deleted": _("Image deleted in IMS"),
}


def reason_label(code: str) -> str:
    return str(REASON_LABELS.get(code, code))


def reason_words(upload: Upload) -> str:
    """Why a failed, refused, rejected (or reconnect-needed) upload stopped, in words; else ""."""
    if upload.status not in REASON_STATES:
        return ""
    return upload.error_message or reason_label(upload.error_code)


# The words of the progress column; progress_words picks one (translated once per page or CSV).
PROGRESS_WORDS = {
    "received": _("%(percent)d %% received"),
    "converted": _("%(percent)d %% converted"),
    "sent": _("%(percent)d %% sent"),
    "sent_in_full": _("Sent in full"),
    "not_sent_yet": _("Received, not sent yet"),
    "not_sent": _("Not sent"),
    "stopped_sent": _("Stopped at %(percent)d %% sent"),
    "stopped_received": _("Stopped at %(percent)d %% received"),
    "stopped_before_sending": _("Stopped before sending"),
}


def progress_texts() -> dict[str, str]:
    """PROGRESS_WORDS in the current language, for many rows at once."""
    return {key: str(words) for key, words in PROGRESS_WORDS.items()}


def progress_words(upload: Upload, texts: dict[str, str] | None = None) -> str:
    """How far an upload got, in words that fit its state: a moving upload's share done, and for
    one that stopped where it stopped ("Stopped at 40 % sent"), never a half-full bar. `texts`:
    progress_texts(), when many rows are written."""
    texts = texts or progress_texts()
    status = upload.status
    received = _percent(upload.received_bytes, upload.size)
    sent = _percent(upload.sent_bytes, upload.send_size or upload.size)
    if status in RECEIVING_STATES:  # also while sent on to IMS as it arrives (sending_early)
        return texts["received"] % {"percent": received}
    if status == Status.CONVERTING:
        return texts["converted"] % {"percent": upload.convert_percent}
    if status == Status.PUSHING:
        return texts["sent"] % {"percent": sent}
    if status in {Status.PROCESSING, Status.READY}:
        return texts["sent_in_full"]
    if status in {Status.RECEIVED, Status.CHECKING, Status.AWAITING_REVIEW}:
        return texts["not_sent_yet"]
    if status in {Status.REFUSED, Status.REJECTED}:
        return texts["not_sent"]
    # FAILED, RECONNECT, CANCELLED: where it stopped.
    if upload.sent_bytes:
        return texts["stopped_sent"] % {"percent": sent}
    if received < 100:
        return texts["stopped_received"] % {"percent": received}
    return texts["stopped_before_sending"]


def moving_percent(upload: Upload) -> int | None:
    """The share done of an upload that moves right now (its bar); None for every other."""
    if upload.status in RECEIVING_STATES:
        return _percent(upload.received_bytes, upload.size)
    if upload.status == Status.CONVERTING:
        return upload.convert_percent
    if upload.status == Status.PUSHING:
        return _percent(upload.sent_bytes, upload.send_size or upload.size)
    return None


def _percent(done: int, whole: int) -> int:
    return min(100, int(done * 100 / whole)) if whole else 0


# ---------------------------------------------------------------------------------------------
# The filters


class DateInput(forms.DateInput):
    input_type = "date"


class UploadFilterForm(forms.Form):
    """The All uploads filters, read from GET; an empty field filters nothing."""

    q = forms.CharField(label=_("Search"), required=False, max_length=255,
                        help_text=_("Image name, file name or IMS image id"))
    state = forms.ChoiceField(label=_("State"), required=False)
    owner = forms.ModelChoiceField(label=_("Owner"), required=False, queryset=get_user_model().objects.none(),
                                   empty_label=pgettext_lazy("any owner", "Any"))
    disk_format = forms.ChoiceField(label=_("Format"), required=False)
    reason = forms.ChoiceField(label=_("Reason"), required=False)
    created_from = forms.DateField(label=_("Uploaded from"), required=False, widget=DateInput)
    created_to = forms.DateField(label=_("Uploaded until"), required=False, widget=DateInput)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        anything = [("", pgettext_lazy("any value", "Any"))]
        self.fields["state"].choices = anything + list(Status.choices)
        self.fields["disk_format"].choices = anything + list(DiskFormat.choices)
        self.fields["owner"].queryset = (
            get_user_model().objects.filter(pk__in=Upload.objects.values("owner_id")).order_by("username")
        )
        self.fields["owner"].label_from_instance = lambda user: user.get_full_name() or user.get_username()
        codes = (Upload.objects.filter(status__in=REASON_STATES).exclude(error_code="")
                 .order_by().values_list("error_code", flat=True).distinct())
        self.fields["reason"].choices = anything + sorted(
            ((code, reason_label(code)) for code in codes), key=lambda choice: str(choice[1]).lower()
        )

    def clean(self):
        data = super().clean()
        start, end = data.get("created_from"), data.get("created_to")
        if start and end and start > end:
            self.add_error("created_to", _("The end of the range comes before its start."))
        return data

    def values(self) -> dict:
        """The valid fields' values: an invalid field (a state that does not exist, a bad date)
        filters nothing, and the page says why next to it."""
        if not self.is_bound:
            return {}
        self.is_valid()
        return {name: value for name, value in self.cleaned_data.items() if value not in (None, "")}


# What no row of the list shows: left in the database (JSON to parse, the encrypted token).
LIST_SKIPS = ("inspection", "tags", "checked_file", "received_sums", "owner__cloud_account__token_encrypted")


def filtered(values: dict) -> QuerySet:
    """The uploads the filters let through, newest first (the index uploads_upload_newest_idx)."""
    rows = Upload.objects.all()
    if values.get("state"):
        rows = rows.filter(status=values["state"])
    if values.get("owner"):
        rows = rows.filter(owner=values["owner"])
    if values.get("disk_format"):
        rows = rows.filter(disk_format=values["disk_format"])
    if values.get("reason"):
        rows = rows.filter(status__in=REASON_STATES, error_code=values["reason"])
    if values.get("created_from"):
        rows = rows.filter(created_at__gte=_start_of(values["created_from"]))
    if values.get("created_to"):
        rows = rows.filter(created_at__lt=_start_of(values["created_to"] + timedelta(days=1)))
    if values.get("q"):
        text = values["q"].strip()
        rows = rows.filter(Q(name__icontains=text) | Q(filename__icontains=text) | Q(ims_image_id__icontains=text))
    return rows.order_by("-created_at", "-pk")


def with_details(ids: list[int]) -> list[Upload]:
    """The uploads of one page, in the order of `ids`, with their owners and cloud accounts. A page
    is found as ids first (the index alone, however late the page), then only its rows are read."""
    rows = Upload.objects.select_related("owner", "owner__cloud_account").defer(*LIST_SKIPS).in_bulk(ids)
    return [rows[pk] for pk in ids if pk in rows]


def _start_of(day: date) -> datetime:
    """Midnight at the start of `day` in the portal's time zone (a range on the column itself,
    which an index can serve, rather than on its date)."""
    return timezone.make_aware(datetime.combine(day, time.min))


# ---------------------------------------------------------------------------------------------
# CSV

# A spreadsheet runs a cell that starts with one of these as a formula (CSV injection, OWASP):
# such a cell gets a leading ' so that it is shown as text.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value) -> str | int:
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def csv_header() -> list[str]:
    return [
        gettext("Image name"), gettext("File name"), gettext("Owner"), gettext("Cloud project"), gettext("State"),
        gettext("Reason code"), gettext("Reason"), gettext("Format"), gettext("Size (bytes)"), gettext("Size"),
        gettext("Progress"), gettext("IMS image id"), gettext("Uploaded (UTC)"), gettext("Last change (UTC)"),
        gettext("Upload id"),
    ]


# The columns the CSV reads: plain values, not model instances (10,000 rows are written in
# about a second this way; bench/review.py).
CSV_COLUMNS = (
    "uid", "name", "filename", "status", "error_code", "error_message", "disk_format", "size", "received_bytes",
    "sent_bytes", "send_size", "convert_percent", "ims_image_id", "created_at", "status_changed_at",
    "owner__username", "owner__cloud_account__project_name", "owner__cloud_account__project_id",
)


def csv_rows(rows: QuerySet) -> Iterator[list]:
    """The CSV's rows for the uploads of `rows`, read in chunks. Cells a person or IMS wrote are
    made safe (safe_cell); the others are the portal's own words, numbers and times."""
    states = {value: str(label) for value, label in Status.choices}
    formats = {value: str(label) for value, label in DiskFormat.choices}
    texts = progress_texts()
    for values in rows.values(*CSV_COLUMNS).iterator(chunk_size=2000):
        upload = SimpleNamespace(**values)  # what progress_words and reason_words read of a row
        yield [
            safe_cell(upload.name), safe_cell(upload.filename), safe_cell(upload.owner__username),
            safe_cell(upload.owner__cloud_account__project_name or upload.owner__cloud_account__project_id or ""),
            states.get(upload.status, upload.status), upload.error_code if upload.status in REASON_STATES else "",
            safe_cell(reason_words(upload)), formats.get(upload.disk_format, upload.disk_format), upload.size,
            human_size(upload.size), progress_words(upload, texts), safe_cell(upload.ims_image_id),
            _utc(upload.created_at), _utc(upload.status_changed_at), str(upload.uid),
        ]


def _utc(moment) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment else ""


class _Line:
    """csv.writer writes into this and gets the line back, so that lines are streamed one by one."""

    def write(self, text: str) -> str:
        return text


# Lines sent to the client at once: fewer, larger pieces cost less than one per row.
CSV_LINES_PER_PIECE = 200


def csv_lines(rows: QuerySet) -> Iterator[str]:
    """The CSV: the header line at once (the download starts before the database is asked), then
    the rows, one per upload, in pieces of CSV_LINES_PER_PIECE lines."""
    writer = csv.writer(_Line())
    yield "\ufeff" + writer.writerow(csv_header())  # the BOM tells spreadsheets it is UTF-8
    piece = []
    for row in csv_rows(rows):
        piece.append(writer.writerow(row))
        if len(piece) >= CSV_LINES_PER_PIECE:
            yield "".join(piece)
            piece = []
    yield "".join(piece)
