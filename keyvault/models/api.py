"""Application clients of the ``/api/v1/`` API and their bearer tokens (issue 17)."""

from __future__ import annotations

from django.core.validators import MaxValueValidator
from django.db import models

#: The highest per-client rate limit (requests/s) that can be set; far beyond what one deployment serves.
MAX_RATE_LIMIT = 1_000_000


class ApiClient(models.Model):
    """An application allowed to use some KEKs over the API, for some operations, in some contexts.

    Created, re-tokened and revoked only through ``keyvault.api.services`` (console and
    ``manage.py api client``), which audits every change.
    """

    class Operation(models.TextChoices):
        GENERATE = "generate", "Generate data key"
        UNWRAP = "unwrap", "Unwrap data key"
        DESCRIBE = "describe", "Describe data keys and KEKs"
        ENCRYPT = "encrypt", "Encrypt"
        DECRYPT = "decrypt", "Decrypt"
        REWRAP = "rewrap", "Rewrap"

    name = models.SlugField("name", max_length=100, unique=True, help_text="The application, e.g. billing.")
    owner = models.CharField("owner", max_length=200, blank=True, help_text="Team or person answerable for it.")
    keks = models.ManyToManyField(
        "keyvault.KeyEncryptionKey", related_name="api_clients", blank=True, verbose_name="allowed KEKs",
        help_text="The only KEKs this client may use; others answer as if they did not exist (404).",
    )
    operations = models.JSONField(
        "allowed operations", default=list, blank=True,
        help_text="Names from: generate, unwrap, describe, encrypt, decrypt, rewrap.",
    )
    context_constraints = models.JSONField(
        "context constraints", default=dict, blank=True,
        help_text='Required encryption-context keys, each with its allowed values or glob patterns '
                  '(an empty list allows any value), e.g. {"service": ["billing"]}.',
    )
    allowed_networks = models.JSONField(
        "source addresses", default=list, blank=True,
        help_text="CIDRs the client may call from; empty allows any address.",
    )
    expires_at = models.DateTimeField("expires", null=True, blank=True,
                                      help_text="After this the client's tokens are refused (401).")
    enabled = models.BooleanField("enabled", default=True, help_text="A revoked client's tokens are refused (401).")
    rate_limit_per_second = models.PositiveIntegerField(
        "rate limit (requests/s)", default=200, validators=[MaxValueValidator(MAX_RATE_LIMIT)],
        help_text="Requests per second across every web process (shared cache); 0 for no limit.",
    )
    created_by = models.CharField("created by", max_length=150, blank=True, editable=False)
    created_at = models.DateTimeField("created", auto_now_add=True)
    revoked_at = models.DateTimeField("revoked", null=True, blank=True, editable=False)

    class Meta:
        """Never deleted, only revoked: the audit log names clients."""

        verbose_name = "API client"
        verbose_name_plural = "API clients"
        ordering = ["name"]
        default_permissions = ("add", "change", "view")

    def __str__(self) -> str:
        return self.name


class ApiToken(models.Model):
    """One bearer token of a client, stored only as an HMAC keyed with a server-side secret.

    A client has at most two usable tokens: after a rotation the previous one keeps
    working until ``expires_at`` (the overlap), then is refused.
    """

    client = models.ForeignKey(ApiClient, on_delete=models.CASCADE, related_name="tokens", verbose_name="client")
    digest = models.CharField(
        "token HMAC", max_length=64, unique=True, editable=False,
        help_text="HMAC-SHA256 of the token under a key derived from the server's secret key; never the token.",
    )
    prefix = models.CharField("prefix", max_length=12, editable=False,
                              help_text="The token's first characters, to tell tokens apart.")
    created_at = models.DateTimeField("created", auto_now_add=True)
    expires_at = models.DateTimeField("expires", null=True, blank=True, editable=False,
                                      help_text="Set when a newer token replaces this one (end of the overlap).")
    revoked_at = models.DateTimeField("revoked", null=True, blank=True, editable=False)

    class Meta:
        """Written only by ``keyvault.api.services``."""

        verbose_name = "API token"
        verbose_name_plural = "API tokens"
        ordering = ["-created_at", "-pk"]
        default_permissions = ()

    def __str__(self) -> str:
        return f"{self.prefix}… of {self.client_id}"
