from django.urls import include, path

from uploads import tus, views

# One upload's own page, its live status, and the buttons on it (each a POST).
upload_urls = [
    path("", views.upload_detail, name="upload_detail"),
    path("status", views.upload_status, name="upload_status"),
    path("retry", views.upload_retry, name="upload_retry"),
    path("cancel", views.upload_cancel, name="upload_cancel"),
    path("use-format", views.upload_use_format, name="upload_use_format"),
]

urlpatterns = [
    path("", views.home, name="home"),
    path("upload/", views.upload_page, name="upload"),
    path("uploads/", views.my_uploads, name="my_uploads"),
    path("uploads/<uuid:uid>/", include(upload_urls)),
    path("cloud/", views.cloud_account, name="cloud_account"),
    path("cloud/disconnect", views.cloud_disconnect, name="cloud_disconnect"),
    path("tus/", tus.tus_collection, name="tus_collection"),
    path("tus/<uuid:uid>", tus.tus_resource, name="tus_resource"),
]
