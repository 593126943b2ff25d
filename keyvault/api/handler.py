"""The application API's own WSGI handler: the same project, only the middleware an API call needs.

The console's middleware stack (sessions, CSRF, authentication, OTP, lockout, messages, time
zones, CSP, static files, the health probe) does nothing for a bearer-token JSON call and cost
about 10% of a single unwrap (3.1 -> 2.8 ms per call in one process, ``bench/api_profile.py``).
:func:`dispatch` sends ``/api/`` requests through :data:`API_MIDDLEWARE`, the rest through the
full stack. What the API keeps: ``SecurityMiddleware`` (HTTPS redirect, HSTS, nosniff,
referrer policy), the malformed-request guard and ``CommonMiddleware`` (``ALLOWED_HOSTS``);
its own views authenticate, limit and audit.
"""

from __future__ import annotations

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.handlers.wsgi import WSGIHandler
from django.test.utils import override_settings

API_PREFIX = "/api/"
API_MIDDLEWARE = (
    "django.middleware.security.SecurityMiddleware",
    "keyvault.web.request_guard.RejectMalformedRequestMiddleware",
    "django.middleware.common.CommonMiddleware",  # the Host header checked against ALLOWED_HOSTS
)


class ApiHandler(WSGIHandler):
    """A WSGI handler whose middleware chain is :data:`API_MIDDLEWARE`, built once at start."""

    def load_middleware(self, is_async: bool = False) -> None:
        # Django builds the chain from settings.MIDDLEWARE; it is read here, once, at start.
        if not set(API_MIDDLEWARE) <= set(settings.MIDDLEWARE):
            raise ImproperlyConfigured("the API's middleware must be a part of settings.MIDDLEWARE")
        with override_settings(MIDDLEWARE=list(API_MIDDLEWARE)):
            super().load_middleware(is_async)


def dispatch(console: WSGIHandler):
    """The project's WSGI application: ``/api/`` to an :class:`ApiHandler`, everything else to ``console``."""
    api = ApiHandler()

    def application(environ, start_response):
        if environ.get("PATH_INFO", "").startswith(API_PREFIX):
            return api(environ, start_response)
        return console(environ, start_response)

    return application
