from django.contrib import admin
from django.urls import include, path

from keyvault.api.views import api as application_api
from keyvault.audit import siem
from keyvault.console import report_views, views as console_views
from keyvault.console.admin_views import providers_view
from keyvault.console.otp import enrol_view, register_device_admin, verify_view
from keyvault.ops.healthz import healthz
from keyvault.ops.metrics import metrics_view

register_device_admin()  # django-otp's own device admin would show the TOTP secret

urlpatterns = [
    path("metrics", metrics_view, name="metrics"),
    path("healthz", healthz, name="healthz"),
    path("otp/enrol/", enrol_view, name="otp-enrol"),
    path("otp/verify/", verify_view, name="otp-verify"),
    path("keyvault/providers/", admin.site.admin_view(providers_view), name="keyvault_providers"),
    path("search/", admin.site.admin_view(console_views.search_view), name="console-search"),
    path("preferences/", admin.site.admin_view(console_views.preferences_view), name="console-preferences"),
    path("api/v1/", application_api.urls),
    path("siem/events", siem.events_view, name="siem-events"),
    path("reports/", include(report_views.urlpatterns())),
    path("", admin.site.admin_view(report_views.console_index), name="console-home"),  # admin:index, with dashboard
    path("", admin.site.urls),
]
