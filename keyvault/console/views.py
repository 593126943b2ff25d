"""The console's global search page and the user's Preferences page: thin callers of
``keyvault.console.search`` and ``keyvault.console.timezones``.

Both are wrapped in ``admin.site.admin_view`` in ``keyvault/urls.py`` (login, staff, never cached).
Search shows each kind only to whoever may view it; a preference is the signed-in user's own.
"""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.http import HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_GET, require_http_methods

from keyvault.audit import Actor
from keyvault.console import search, timezones
from keyvault.exceptions import InvalidPreference, InvalidSearch


@require_GET
def search_view(request):
    """``/search/?q=TERM``: every KEK, data key, run, secret and audit event the term names."""
    term = request.GET.get("q", "")[: search.MAX_TERM + 1]
    results, error = None, ""
    if term.strip():
        try:
            results = search.search(term, user=request.user)
        except InvalidSearch as exc:
            error = str(exc)
    request.current_app = admin.site.name
    context = {**admin.site.each_context(request), "title": "Search", "search_term": term.strip(),
               "results": results, "error": error}
    return TemplateResponse(request, "keyvault/search.html", context, status=400 if error else 200)


class PreferencesForm(forms.Form):
    time_zone = forms.ChoiceField(
        label="Time zone", help_text="Every time in the console is shown in this zone, and names it. Default: UTC.")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fields["time_zone"].choices = [(zone, zone) for zone in timezones.available_time_zones()]


@require_http_methods(["GET", "POST"])
def preferences_view(request):
    """The signed-in user's own console preferences (time zone)."""
    form = PreferencesForm(request.POST if request.method == "POST" else None,
                           initial={"time_zone": timezones.time_zone_of(request.user)})
    if request.method == "POST" and form.is_valid():
        try:
            timezones.set_time_zone(request.user, time_zone=form.cleaned_data["time_zone"],
                                    actor=Actor.from_request(request))
        except InvalidPreference as exc:
            form.add_error("time_zone", str(exc))
        else:
            messages.success(request, f"Times are now shown in {form.cleaned_data['time_zone']}.")
            return HttpResponseRedirect(reverse("console-preferences"))
    request.current_app = admin.site.name
    context = {**admin.site.each_context(request), "title": "Preferences", "form": form, "now": timezone.now()}
    return TemplateResponse(request, "keyvault/preferences.html", context)
