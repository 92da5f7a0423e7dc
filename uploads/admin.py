"""Admins see every upload, its timeline with the raw IMS replies, and can retry or cancel.

Retry refuses what the check refused (a refused file is sent again only with another format,
by its owner); Cancel also removes a failed or refused upload and its staged file."""

from django.contrib import admin, messages
from django.utils.translation import gettext, gettext_lazy as _

from django.utils.html import format_html
from django.utils.text import Truncator
from django.utils.translation import gettext_lazy as _

from uploads import all_uploads, services
from uploads.models import CloudAccount, Upload, UploadEvent
from uploads.i18n import local_size


class UploadEventInline(admin.TabularInline):
    model = UploadEvent
    fields = ("at", "from_status", "to_status", "message", "detail")
    readonly_fields = fields
    extra = 0
    can_delete = False
    verbose_name_plural = _("Timeline")

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(Upload)
class UploadAdmin(admin.ModelAdmin):
    # Fits a laptop screen: the file name under the image name, the IMS image id searched, not shown
    # (the reviewers' All uploads page, uploads/all_uploads.py, is the full list with filters and CSV).
    list_display = (
        "name_and_file", "owner", "status", "reason", "file_size", "disk_format", "progress", "status_changed_at",
    )
    list_filter = ("status", "disk_format", ("error_code", admin.AllValuesFieldListFilter), "created_at", "owner")
    search_fields = ("name", "filename", "ims_image_id")
    list_select_related = ("owner",)
    list_per_page = 50
    date_hierarchy = "created_at"
    inlines = [UploadEventInline]
    actions = ["retry_uploads", "cancel_uploads"]
    readonly_fields = [f.name for f in Upload._meta.fields] + ["progress"]

    def has_add_permission(self, request):
        return False  # uploads come from the upload page

    @admin.display(description=_("Image and file"), ordering="name")
    def name_and_file(self, upload):
        return format_html("{}<br><small>{}</small>", upload.name, upload.filename)

    @admin.display(description=_("Size"), ordering="size")
    def file_size(self, upload):
        return local_size(upload.size)

    @admin.display(description=_("Progress"))
    def progress(self, upload):
        return all_uploads.progress_words(upload)

    @admin.display(description=_("Reason"), ordering="error_code")
    def reason(self, upload):
        return Truncator(all_uploads.reason_words(upload)).chars(120) or "—"

    def _each(self, request, queryset, service, done: str):
        for upload in queryset:
            try:
                service(upload=upload, by=request.user.get_username())
            except services.ServiceError as exc:
                self.message_user(request, f"{upload}: {exc}", messages.WARNING)
            else:
                self.message_user(request, f"{upload}: {done}", messages.SUCCESS)

    def has_review_permission(self, request) -> bool:
        """Retry and Cancel need uploads.review_upload (superusers have every permission)."""
        return request.user.has_perm("uploads.review_upload")

    @admin.action(description=_("Retry the selected uploads"), permissions=["review"])
    def retry_uploads(self, request, queryset):
        self._each(request, queryset, services.upload_retry, gettext("queued to be sent again"))

    @admin.action(
        description=_("Cancel or remove the selected uploads (deletes staged file and IMS image)"), permissions=["review"]
    )
    def cancel_uploads(self, request, queryset):
        self._each(request, queryset, services.upload_cancel, gettext("cancelled"))


@admin.register(CloudAccount)
class CloudAccountAdmin(admin.ModelAdmin):
    list_display = ("user", "domain_name", "user_name", "project_name", "expires_at", "connected_at")
    search_fields = ("user__username", "user_name", "domain_name", "project_name")
    # The encrypted token is never shown, not even to admins.
    fields = ("user", "domain_name", "user_name", "project_name", "project_id", "expires_at", "connected_at")
    readonly_fields = fields

    def has_add_permission(self, request):
        return False
