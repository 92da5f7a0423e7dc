"""The reviewers' overview pages: every upload (with filters and a CSV export of the filtered list)
and the dashboard. Thin: read the request, ask uploads.all_uploads / uploads.dashboard, render."""

from django.core.paginator import Paginator
from django.http import StreamingHttpResponse
from django.shortcuts import render
from django.utils import timezone
from django.utils.formats import date_format
from django.views.decorators.cache import never_cache

from uploads import all_uploads, charts, dashboard
from uploads.models import Status
from uploads.review_views import reviewer_only
from uploads.sizes import human_size

ALL_UPLOADS_PER_PAGE = 50


def _filters(request) -> all_uploads.UploadFilterForm:
    form_fields = set(all_uploads.UploadFilterForm.base_fields)
    bound = any(request.GET.get(name) for name in form_fields)
    return all_uploads.UploadFilterForm(request.GET if bound else None)


@reviewer_only
def all_uploads_page(request):
    form = _filters(request)
    ids = all_uploads.filtered(form.values()).values_list("pk", flat=True)
    page = Paginator(ids, ALL_UPLOADS_PER_PAGE).get_page(request.GET.get("page"))
    states = {value: str(label) for value, label in Status.choices}  # once, not get_status_display per row
    texts = all_uploads.progress_texts()
    rows = [
        {"upload": upload, "state": states.get(upload.status, upload.status), "reason": all_uploads.reason_words(upload),
         "progress": all_uploads.progress_words(upload, texts), "moving": all_uploads.moving_percent(upload)}
        for upload in all_uploads.with_details(list(page.object_list))
    ]
    query = request.GET.copy()
    query.pop("page", None)
    return render(request, "uploads/all_uploads.html", {
        "form": form, "page": page, "rows": rows, "query": query.urlencode(), "filtered": form.is_bound,
    })


@reviewer_only
def all_uploads_csv(request):
    """Exactly the list the page shows with the same filters (every page of it), streamed."""
    rows = all_uploads.filtered(_filters(request).values())
    response = StreamingHttpResponse(all_uploads.csv_lines(rows), content_type="text/csv; charset=utf-8")
    stamp = timezone.now().strftime("%Y%m%d-%H%M")
    response["Content-Disposition"] = f'attachment; filename="uploads-{stamp}.csv"'
    return response


@reviewer_only
def dashboard_page(request):
    per_day = dashboard.bytes_sent_per_day()
    chart = charts.bar_chart([(_day_label(day), sent) for day, sent in per_day], words=human_size)
    states = dashboard.uploads_per_state()
    return render(request, "uploads/dashboard.html", {
        "states": states,
        "stops": dashboard.stops_by_reason(),
        "stops_days": dashboard.STOPS_DAYS,
        "per_day": per_day,
        "per_day_total": sum(sent for _, sent in per_day),
        "bytes_days": dashboard.BYTES_DAYS,
        "chart": chart,
        "pushes": dashboard.running_pushes(),
        "pushes_total": sum(state["count"] for state in states if state["status"] in dashboard.SENDING),
        # Without JavaScript the page asks the workers itself when told to (?workers=1).
        "workers": dashboard.workers_report() if request.GET.get("workers") else None,
        "ping_seconds": dashboard.WORKER_PING_SECONDS,
    })


def _day_label(day) -> str:
    return date_format(day, "j M")  # "30 Nov"; in the reader's language


@never_cache
@reviewer_only
def dashboard_workers(request):
    """The workers part of the dashboard, which the page fetches after it has shown the rest:
    asking the workers waits up to dashboard.WORKER_PING_SECONDS for their answers."""
    return render(request, "uploads/snippets/dashboard_workers.html", {
        "workers": dashboard.workers_report(), "ping_seconds": dashboard.WORKER_PING_SECONDS,
    })
