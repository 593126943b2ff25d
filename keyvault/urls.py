from django.contrib import admin
from django.urls import include, path

from keyvault import report_views, siem
from keyvault.admin_views import providers_view
from keyvault.metrics import metrics_view

urlpatterns = [
    path("metrics", metrics_view, name="metrics"),
    path("keyvault/providers/", admin.site.admin_view(providers_view), name="keyvault_providers"),
    path("siem/events", siem.events_view, name="siem-events"),
    path("reports/", include(report_views.urlpatterns())),
    path("", admin.site.admin_view(report_views.console_index), name="console-home"),  # admin:index, with dashboard
    path("", admin.site.urls),
]
