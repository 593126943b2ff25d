"""The Django project ``bench/api_frameworks.py`` serves: one endpoint, three ways.

``POST /{plain,ninja,drf}/items``: a bearer token compared in constant time, a small JSON
body validated (``name`` ≤ 100 chars, ``count`` 0–1000, ``context`` a string map), the same
JSON answer. ``plain`` is Django alone (the floor); ``ninja`` is Django Ninja with a pydantic
schema; ``drf`` is Django REST Framework with a serializer. No database, no middleware: what
differs between them is the framework.
"""


import functools
import hmac
import json

SECRET_KEY = "bench-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
ROOT_URLCONF = __name__
MIDDLEWARE: list[str] = []
INSTALLED_APPS = ["django.contrib.contenttypes", "rest_framework", "drf_spectacular", "ninja"]
DATABASES: dict = {}
USE_TZ = True
TIME_ZONE = "UTC"
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [],  # set on the view (this module is also the settings)
    "DEFAULT_PERMISSION_CLASSES": [],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "UNAUTHENTICATED_USER": None,
}

TOKEN = "kvapi_bench-token-0123456789abcdef0123456789abcdef"
_EXPECTED = f"Bearer {TOKEN}".encode()


def token_ok(header: str | None) -> bool:
    return hmac.compare_digest((header or "").encode(), _EXPECTED)


def answer(name: str, count: int, context: dict) -> dict:
    return {"name": name, "count": count, "context_keys": sorted(context), "ok": True}


# -- plain Django (the floor) ------------------------------------------------------------------------


def plain_view(request):
    from django.http import JsonResponse

    if request.method != "POST":
        return JsonResponse({"error": "method"}, status=405)
    if not token_ok(request.headers.get("Authorization")):
        return JsonResponse({"error": "unauthorized"}, status=401)
    try:
        body = json.loads(request.body)
        name, count, context = body["name"], body["count"], body.get("context", {})
        valid = (isinstance(name, str) and len(name) <= 100 and type(count) is int and 0 <= count <= 1000
                 and isinstance(context, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                       for k, v in context.items()))
    except (ValueError, KeyError, TypeError):
        valid = False
    if not valid:
        return JsonResponse({"error": "invalid"}, status=400)
    return JsonResponse(answer(name, count, context))


# -- Django Ninja --------------------------------------------------------------------------------------


@functools.cache
def _ninja_api():
    from ninja import NinjaAPI, Schema
    from ninja.security import HttpBearer
    from pydantic import Field

    class Bearer(HttpBearer):
        def authenticate(self, request, token):
            return token if token_ok(f"Bearer {token}") else None

    class ItemIn(Schema):
        name: str = Field(max_length=100)
        count: int = Field(ge=0, le=1000)
        context: dict[str, str] = Field(default_factory=dict)

    class ItemOut(Schema):
        name: str
        count: int
        context_keys: list[str]
        ok: bool

    api = NinjaAPI(auth=Bearer(), urls_namespace="bench-ninja", docs_url=None)

    @api.post("/items", response=ItemOut)
    def items(request, payload: ItemIn):
        return answer(payload.name, payload.count, payload.context)

    return api


# -- Django REST Framework -----------------------------------------------------------------------------


@functools.cache
def _drf_view():
    from rest_framework import authentication, exceptions, permissions, serializers
    from rest_framework.response import Response
    from rest_framework.views import APIView

    class Bearer(authentication.BaseAuthentication):
        def authenticate(self, request):
            if not token_ok(request.META.get("HTTP_AUTHORIZATION")):
                raise exceptions.AuthenticationFailed("unauthorized")
            return ("client", TOKEN)

        def authenticate_header(self, request):
            return "Bearer"

    class Authenticated(permissions.BasePermission):
        def has_permission(self, request, view):
            return request.auth is not None

    class ItemIn(serializers.Serializer):
        name = serializers.CharField(max_length=100)
        count = serializers.IntegerField(min_value=0, max_value=1000)
        context = serializers.DictField(child=serializers.CharField(), required=False, default=dict)

    class ItemOut(serializers.Serializer):
        name = serializers.CharField()
        count = serializers.IntegerField()
        context_keys = serializers.ListField(child=serializers.CharField())
        ok = serializers.BooleanField()

    class Items(APIView):
        authentication_classes = [Bearer]
        permission_classes = [Authenticated]

        def post(self, request):
            incoming = ItemIn(data=request.data)
            incoming.is_valid(raise_exception=True)
            data = incoming.validated_data
            return Response(ItemOut(answer(data["name"], data["count"], data["context"])).data)

    return Items


def __getattr__(name):
    """``urlpatterns``, built once Django is set up (this module is the settings too)."""
    if name == "urlpatterns":
        return _urls()
    raise AttributeError(name)


@functools.cache
def _urls():
    from django.urls import path

    return [
        path("plain/items", plain_view),
        path("ninja/", _ninja_api().urls),
        path("drf/items", _drf_view().as_view()),
    ]


def wsgi():
    """The WSGI application (``gunicorn 'bench.api_frameworks_app:wsgi()'``)."""
    import os

    from django.core.wsgi import get_wsgi_application

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", __name__)
    return get_wsgi_application()
