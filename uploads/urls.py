from django.urls import include, path

from uploads import review_views, tus, views

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
    path("review/", review_views.review_queue, name="review_queue"),
    path("review/decide", review_views.review_decide, name="review_decide"),
    path("review/<uuid:uid>/", review_views.review_page, name="review_page"),
    path("review/<uuid:uid>/retry", review_views.review_retry, name="review_retry"),
    path("review/<uuid:uid>/cancel", review_views.review_cancel, name="review_cancel"),
    path("review/<uuid:uid>/delete-image", review_views.review_delete_image, name="review_delete_image"),
    path("cloud/", views.cloud_account, name="cloud_account"),
    path("cloud/disconnect", views.cloud_disconnect, name="cloud_disconnect"),
    path("profile/", views.profile, name="profile"),
    path("tus/", tus.tus_collection, name="tus_collection"),
    path("tus/<uuid:uid>", tus.tus_resource, name="tus_resource"),
]
