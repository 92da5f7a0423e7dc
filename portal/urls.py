from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path
from django.utils.translation import gettext_lazy as _
from django.views.decorators.cache import cache_page
from django.views.decorators.http import last_modified
from django.views.i18n import JavaScriptCatalog, set_language

from portal.i18n import catalogue_changed_at

admin.site.site_header = _("IMS upload portal — administration")
admin.site.site_title = _("IMS upload portal")

# The words of static/js/*.js in the person's language (djangojs.po). Pages ask for it with the
# language and the catalogue's version in the query (portal/i18n.py), so a browser keeps one copy
# per language and version; the server keeps each language's answer a day (the cache key
# carries the active language).
javascript_catalog = last_modified(catalogue_changed_at)(
    cache_page(24 * 3600, key_prefix="jsi18n")(JavaScriptCatalog.as_view(packages=["uploads"]))
)

urlpatterns = [
    path("admin/", admin.site.urls),
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    # The language switch in the header posts here (Django's set_language: a cookie, then `next`).
    path("i18n/setlang/", set_language, name="set_language"),
    path("jsi18n/", javascript_catalog, name="javascript_catalog"),
    path("", include("uploads.urls")),
]
