"""Admins see every upload, its timeline with the raw IMS replies, and can retry or cancel.

Retry refuses what the check refused (a refused file is sent again only with another format,
by its owner); Cancel also removes a failed or refused upload and its staged file."""

from django.contrib import admin, messages
from django.utils.translation import gettext, gettext_lazy as _

from uploads import services
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
    list_display = (
        "name", "owner", "filename", "file_size", "disk_format", "status", "progress", "ims_image_id", "created_at",
    )
    list_filter = ("status", "owner")
    search_fields = ("name", "filename", "ims_image_id")
    date_hierarchy = "created_at"
    inlines = [UploadEventInline]
    actions = ["retry_uploads", "cancel_uploads"]
    readonly_fields = [f.name for f in Upload._meta.fields] + ["progress"]

    def has_add_permission(self, request):
        return False  # uploads come from the upload page

    @admin.display(description=_("Size"), ordering="size")
    def file_size(self, upload):
        return local_size(upload.size)

    @admin.display(description=_("Progress"))
    def progress(self, upload):
        return f"{upload.progress_percent}%"

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
