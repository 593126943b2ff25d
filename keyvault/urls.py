from django.contrib import admin
from django.urls import path

from keyvault.admin_views import providers_view
from keyvault.metrics import metrics_view

urlpatterns = [
    path("metrics", metrics_view, name="metrics"),
    path("keyvault/providers/", admin.site.admin_view(providers_view), name="keyvault_providers"),
    path("", admin.site.urls),
]
