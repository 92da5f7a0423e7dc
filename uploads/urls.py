from django.urls import path

from uploads import tus, views

urlpatterns = [
    path("", views.home, name="home"),
    path("upload/", views.upload_page, name="upload"),
    path("uploads/", views.my_uploads, name="my_uploads"),
    path("uploads/<uuid:uid>/", views.upload_detail, name="upload_detail"),
    path("uploads/<uuid:uid>/status", views.upload_status, name="upload_status"),
    path("uploads/<uuid:uid>/retry", views.upload_retry, name="upload_retry"),
    path("uploads/<uuid:uid>/cancel", views.upload_cancel, name="upload_cancel"),
    path("uploads/<uuid:uid>/use-format", views.upload_use_format, name="upload_use_format"),
    path("cloud/", views.cloud_account, name="cloud_account"),
    path("cloud/disconnect", views.cloud_disconnect, name="cloud_disconnect"),
    path("tus/", tus.tus_collection, name="tus_collection"),
    path("tus/<uuid:uid>", tus.tus_resource, name="tus_resource"),
]
