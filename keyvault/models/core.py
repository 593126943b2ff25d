"""Key inventory and audit log.

Key bytes are never stored here in plaintext: a :class:`KeyEncryptionKey` is only a
reference to a key inside its provider, and a :class:`DataKey` holds its DEK
wrapped by that KEK.
"""

from __future__ import annotations

import hashlib

from django.db import models
from django.db.models import Q

from keyvault.exceptions import AuditWriteRefused


class KeyEncryptionKey(models.Model):
    """A key-encryption key (KEK): the key at a KMS provider that wraps data keys.

    Its rotation schedule (period, next due date) is its rotation policy's
    (``rotation.RotationPolicy``), kept there only.
    """

    class State(models.TextChoices):
        ENABLED = "enabled", "Enabled"
        DISABLED = "disabled", "Disabled"
        PENDING_DELETION = "pending_deletion", "Pending deletion"
        DESTROYED = "destroyed", "Destroyed"

    #: The transitions AWS KMS documents: cancelling a deletion leaves the key disabled.
    TRANSITIONS = {
        State.ENABLED: {State.DISABLED, State.PENDING_DELETION},
        State.DISABLED: {State.ENABLED, State.PENDING_DELETION},
        State.PENDING_DELETION: {State.DISABLED, State.DESTROYED},
        State.DESTROYED: set(),
    }

    name = models.SlugField(
        "name", max_length=100, unique=True, help_text="Unique name used in the console, the CLI and the API."
    )
    provider = models.CharField(
        "provider", max_length=32, help_text="KMS provider holding the key material (local, aws, gcp, vault, pkcs11)."
    )
    provider_key_id = models.CharField(
        "provider key reference",
        max_length=512,
        help_text="The key's identifier at its provider, stored exactly as the provider returned it.",
    )
    description = models.TextField("purpose", blank=True, help_text="What this key protects and who owns it.")
    state = models.CharField(
        "state", max_length=20, choices=State.choices, default=State.ENABLED, db_index=True,
        help_text="Only enabled keys encrypt or decrypt.",
    )
    deletion_date = models.DateTimeField(
        "deletion date", null=True, blank=True, help_text="While pending deletion: when the key will be destroyed."
    )
    max_encryptions_per_version = models.PositiveBigIntegerField(
        "max encryptions per version",
        null=True,
        blank=True,
        help_text="Rotate once the primary version has encrypted this many times (empty: no usage trigger).",
    )
    created_at = models.DateTimeField("created", auto_now_add=True)
    updated_at = models.DateTimeField("updated", auto_now=True)
    last_rotated_at = models.DateTimeField("last rotated", null=True, blank=True)

    class Meta:
        """KEKs are listed by name; the extra permissions map to the console's actions."""

        verbose_name = "key-encryption key"
        verbose_name_plural = "key-encryption keys"
        ordering = ["name"]
        # Deletion is a scheduled state change, never a row delete.
        default_permissions = ("add", "change", "view")
        permissions = [
            ("rotate_keyencryptionkey", "Can rotate key-encryption keys"),
            ("change_state_keyencryptionkey", "Can enable and disable key-encryption keys"),
            ("schedule_deletion_keyencryptionkey", "Can schedule and cancel deletion of key-encryption keys"),
            ("retire_keyversion", "Can disable and destroy key versions"),
        ]

    def __str__(self) -> str:
        return self.name


class KeyVersion(models.Model):
    """One version of a KEK. Exactly one version per KEK is primary and encrypts."""

    class State(models.TextChoices):
        ENABLED = "enabled", "Enabled"
        DISABLED = "disabled", "Disabled"
        DESTROY_SCHEDULED = "destroy_scheduled", "Destroy scheduled"
        DESTROYED = "destroyed", "Destroyed"

    kek = models.ForeignKey(
        KeyEncryptionKey, on_delete=models.PROTECT, related_name="versions", verbose_name="key-encryption key"
    )
    number = models.PositiveIntegerField("version", help_text="Version number at the provider, starting at 1.")
    state = models.CharField(
        "state", max_length=20, choices=State.choices, default=State.ENABLED,
        help_text="Enabled versions decrypt; only the primary encrypts.",
    )
    is_primary = models.BooleanField("primary", default=False, help_text="The version new data keys are wrapped with.")
    provider_version_ref = models.CharField(
        "provider version reference", max_length=512, blank=True, help_text="The version's name at its provider."
    )
    encrypt_count = models.PositiveBigIntegerField(
        "encryptions", default=0, help_text="Encryptions made with this version, as last reported by the provider."
    )
    # Kept by the key services with every data key they create, rewrap, move or destroy, so the
    # inventory report reads counts instead of counting a million index entries. Signed: rows
    # written around the services (bulk loads) make it drift until ``recount_data_keys``; it
    # must never make a rewrap fail.
    data_keys = models.BigIntegerField(
        "data keys wrapped", default=0, editable=False,
        help_text="Data keys this version wraps, as the key services counted them.",
    )
    created_at = models.DateTimeField("created", auto_now_add=True)

    class Meta:
        """A KEK's versions are numbered uniquely and at most one of them is primary."""

        verbose_name = "key version"
        verbose_name_plural = "key versions"
        ordering = ["kek_id", "number"]
        default_permissions = ("view",)
        constraints = [
            models.UniqueConstraint(fields=["kek", "number"], name="keyversion_unique_number"),
            models.UniqueConstraint(fields=["kek"], condition=Q(is_primary=True), name="keyversion_one_primary"),
        ]

    def __str__(self) -> str:
        return f"{self.kek.name} v{self.number}"


#: Hex digits of a data key's fingerprint.
FINGERPRINT_LENGTH = 16


def wrapped_key_fingerprint(wrapped_key: bytes) -> str:
    """A short, non-reversible identifier of a wrapped key's bytes: what the console shows and searches."""
    return hashlib.sha256(bytes(wrapped_key)).hexdigest()[:FINGERPRINT_LENGTH]


class DataKey(models.Model):
    """A registered data-encryption key (DEK), stored only wrapped by its KEK.

    The encryption context is authenticated but **not secret**: it is stored and
    shown in clear, like AWS KMS logs it in CloudTrail. Never put secrets in it.
    """

    # No index of its own: datakey_kek_version_id starts with kek_id. Every index on DataKey
    # costs a write per rewrapped row (a rewrap changes kek_version, so never a HOT update).
    kek = models.ForeignKey(
        KeyEncryptionKey, on_delete=models.PROTECT, related_name="data_keys", verbose_name="key-encryption key",
        db_index=False,
    )
    kek_version = models.PositiveIntegerField(
        "KEK version", help_text="The KEK version that wrapped this data key (rotation moves it to the primary)."
    )
    wrapped_key = models.BinaryField("wrapped key", help_text="The DEK encrypted by the KEK; never the plaintext.")
    key_spec = models.CharField("key spec", max_length=16, default="AES_256")
    encryption_context = models.JSONField(
        "encryption context",
        default=dict,
        blank=True,
        help_text="Non-secret string pairs bound to the wrapped key; decrypting needs exactly the same pairs.",
    )
    purpose = models.CharField("purpose", max_length=200, blank=True, help_text="What the data key encrypts.")
    owner_ref = models.CharField(
        "owner", max_length=255, blank=True,
        help_text="Who uses the key, e.g. app.model.field or an external id.",
    )
    created_at = models.DateTimeField("created", auto_now_add=True)
    last_rewrapped_at = models.DateTimeField("last rewrapped", null=True, blank=True)
    # Stored, not computed when shown, so that the global search finds a data key by it
    # through an index. The key services write it with ``wrapped_key`` (a rewrap changes both).
    fingerprint = models.CharField(
        "wrapped key fingerprint", max_length=16, blank=True, default="", editable=False,
        help_text="The first 16 hex digits of SHA-256 over the wrapped key: it changes when the key is rewrapped.",
    )

    class Meta:
        """Indexed for the rotation query (KEK, version below N, by id), keyset paging, exact owner lookups
        and the global search by fingerprint (exact or prefix).

        Nothing more: each index is one more write per row a rotation rewraps. ``owner_ref``
        has a plain index (its lookups are exact), not the extra ``LIKE`` pattern index
        ``db_index`` adds on PostgreSQL; ``fingerprint`` has only that pattern index, which
        serves equality too.
        """

        verbose_name = "data key"
        verbose_name_plural = "data keys"
        ordering = ["-id"]
        default_permissions = ("add", "view")
        indexes = [
            models.Index(fields=["kek", "kek_version", "id"], name="datakey_kek_version_id"),
            models.Index(fields=["owner_ref"], name="datakey_owner_ref"),
            models.Index(fields=["fingerprint"], name="datakey_fingerprint", opclasses=["varchar_pattern_ops"]),
        ]
        permissions = [("unwrap_datakey", "Can unwrap data keys")]

    def __str__(self) -> str:
        return f"data key #{self.pk} ({self.kek_id and self.kek.name} v{self.kek_version})"



class AppendOnlyQuerySet(models.QuerySet):
    """Rows that can be read and appended, never changed or removed (the database refuses it too)."""

    refusal = "audit events are append-only"

    def update(self, **kwargs):
        raise AuditWriteRefused(self.refusal)

    def delete(self):
        raise AuditWriteRefused(self.refusal)

    def bulk_update(self, *args, **kwargs):
        raise AuditWriteRefused(self.refusal)


class AuditQuerySet(AppendOnlyQuerySet):
    """Audit events can be read and appended, never changed or removed."""


class AuditEvent(models.Model):
    """An append-only, hash-chained record of one operation.

    ``hash`` is SHA-256 over the canonical serialisation of the event including
    ``prev_hash``, so changing, removing, inserting or reordering any event breaks
    the chain (``manage.py audit verify``). Details never hold key bytes; sensitive
    values are HMAC-SHA256'd with the audit key.
    """

    class Action(models.TextChoices):
        KEK_CREATED = "kek.created", "KEK created"
        KEK_ENABLED = "kek.enabled", "KEK enabled"
        KEK_DISABLED = "kek.disabled", "KEK disabled"
        KEK_DELETION_SCHEDULED = "kek.deletion_scheduled", "KEK deletion scheduled"
        KEK_DELETION_CANCELLED = "kek.deletion_cancelled", "KEK deletion cancelled"
        KEK_DESTROYED = "kek.destroyed", "KEK destroyed"
        KEK_ROTATED = "kek.rotated", "KEK rotated"
        KEK_UPDATED = "kek.updated", "KEK settings changed"
        VERSION_STATE_CHANGED = "version.state_changed", "Key version state changed"
        DATA_KEY_CREATED = "datakey.created", "Data key created"
        DATA_KEY_UNWRAPPED = "datakey.unwrapped", "Data key unwrapped"
        DATA_KEY_REWRAPPED = "datakey.rewrapped", "Data key rewrapped"
        DATA_KEY_DESTROYED = "datakey.destroyed", "Data key destroyed"
        CRYPTO_ENCRYPT = "crypto.encrypt", "Encrypt"
        CRYPTO_DECRYPT = "crypto.decrypt", "Decrypt"
        AUDIT_EXPORTED = "audit.exported", "Audit log exported"
        AUDIT_CHECKPOINT = "audit.checkpoint", "Audit checkpoint signed"
        AUDIT_VERIFIED = "audit.verified", "Audit chain verified"
        LOGIN_FAILED = "auth.login_failed", "Login failed"
        ACCESS_DENIED = "auth.access_denied", "Access denied"
        ROTATION = "rotation", "Rotation event"
        ROTATION_STARTED = "rotation.started", "Rotation run started"
        ROTATION_STATE = "rotation.state_changed", "Rotation run state changed"
        ROTATION_APPROVED = "rotation.approved", "Rotation run approved"
        ROTATION_REJECTED = "rotation.rejected", "Rotation run rejected"
        ROTATION_BREAK_GLASS = "rotation.break_glass", "Rotation approvals bypassed (break-glass)"
        ROTATION_STEP = "rotation.step_ticked", "Runbook step ticked"
        ROTATION_BATCH = "rotation.batch", "Rotation batch rewrapped"
        POLICY_CHANGED = "rotation.policy_changed", "Rotation policy changed"
        SECRET = "secret", "Managed secret event"
        # Who may do what: every change to accounts, roles and second factors (keyvault.access.accounts).
        USER_CREATED = "user.created", "User created"
        USER_CHANGED = "user.changed", "User changed (flags, groups, permissions)"
        USER_PASSWORD_CHANGED = "user.password_changed", "User password changed"
        USER_DELETED = "user.deleted", "User deleted"
        USER_PREFERENCE_CHANGED = "user.preference_changed", "User preference changed (time zone)"
        GROUP_CREATED = "group.created", "Group created"
        GROUP_CHANGED = "group.changed", "Group changed (name, permissions)"
        GROUP_DELETED = "group.deleted", "Group deleted"
        DEVICE_CREATED = "2fa.device_created", "Two-factor device created"
        DEVICE_CONFIRMED = "2fa.device_confirmed", "Two-factor device confirmed"
        DEVICE_DELETED = "2fa.device_deleted", "Two-factor device deleted"
        DEVICE_THROTTLE_RESET = "2fa.throttle_reset", "Two-factor throttling reset"
        SIEM_CONSUMER_CREATED = "siem.consumer_created", "SIEM consumer created"
        SIEM_CONSUMER_CHANGED = "siem.consumer_changed", "SIEM consumer changed"
        API_CLIENT_CREATED = "api.client_created", "API client created"
        API_CLIENT_CHANGED = "api.client_changed", "API client changed (token rotated, revoked)"
        API_DENIED = "api.denied", "API call refused"
        API_READ = "api.read", "API metadata read"
        KMS_MASTER_KEY_REKEYED = "kms.master_key_rekeyed", "Local KMS keyring re-keyed under a new master key"
        OTHER = "other", "Other"

    class Outcome(models.TextChoices):
        SUCCESS = "success", "Success"
        FAILURE = "failure", "Failure"
        DENIED = "denied", "Denied"

    sequence = models.PositiveBigIntegerField(
        "sequence", unique=True, editable=False, help_text="Gapless position in the chain, starting at 1."
    )
    # No single-column indexes: the composite indexes below lead with these columns and serve
    # the same look-ups, and every index is written on every audited call.
    timestamp = models.DateTimeField("time", editable=False)
    actor = models.CharField(
        "actor", max_length=150, editable=False,
        help_text="user:<username>, or system:<component> for beat, workers and bootstrap.",
    )
    action = models.CharField("action", max_length=64, choices=Action.choices, editable=False)
    target_type = models.CharField("target type", max_length=64, blank=True, editable=False)
    target_id = models.CharField("target", max_length=255, blank=True, editable=False)
    outcome = models.CharField("outcome", max_length=16, choices=Outcome.choices, editable=False)
    request_id = models.CharField("request id", max_length=64, blank=True, editable=False)
    ip_address = models.GenericIPAddressField("IP address", null=True, blank=True, editable=False)
    details = models.JSONField("details", default=dict, blank=True, editable=False)
    prev_hash = models.CharField("previous hash", max_length=64, editable=False)
    hash = models.CharField("hash", max_length=64, editable=False)

    objects = AuditQuerySet.as_manager()

    class Meta:
        """Read-only in the console; ``export_auditevent`` lets auditors take the log away."""

        verbose_name = "audit event"
        verbose_name_plural = "audit events"
        ordering = ["-sequence"]
        default_permissions = ("view",)
        permissions = [("export_auditevent", "Can export and verify the audit log")]
        # Each search and filter of the audit list is an index scan that stops after one page (keyset
        # paging on sequence, newest first): by target, by actor, by target id alone, by request id,
        # and by outcome (failures and denials are rare, so "show me the failures" must not scan).
        indexes = [
            models.Index(fields=["target_type", "target_id", "sequence"], name="audit_target_seq"),
            models.Index(fields=["actor", "sequence"], name="audit_actor_seq"),
            models.Index(fields=["action", "sequence"], name="audit_action_seq"),
            models.Index(fields=["target_id", "sequence"], name="audit_target_id_seq"),
            models.Index(fields=["request_id", "sequence"], name="audit_request_id_seq"),
            models.Index(fields=["outcome", "sequence"], name="audit_outcome_seq"),
            # A time range is listed in time order from this index, a page an index range scan
            # wherever the range lies (ordering a range by sequence alone would scan from the head).
            models.Index(fields=["timestamp", "sequence"], name="audit_time_seq"),
        ]

    def __str__(self) -> str:
        return f"#{self.sequence} {self.action} by {self.actor}"

    def save(self, *args, **kwargs):
        if self.pk is not None or not kwargs.get("force_insert"):
            raise AuditWriteRefused("audit events are written only through keyvault.audit and never changed")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise AuditWriteRefused("audit events are append-only")


class AuditChainHeadQuerySet(models.QuerySet):
    """The head is created once and then only moved forward by ``keyvault.audit.record``.

    ``update`` may set the position (``last_sequence`` and ``last_hash`` together) and
    nothing else; the database triggers (migration 0008) refuse moving it backwards or to
    an event that does not exist.
    """

    ADVANCE_FIELDS = frozenset({"last_sequence", "last_hash"})

    def update(self, **kwargs):
        if set(kwargs) != self.ADVANCE_FIELDS:
            raise AuditWriteRefused("the audit chain head only moves forward (last_sequence and last_hash together)")
        return super().update(**kwargs)

    def delete(self):
        raise AuditWriteRefused("the audit chain head cannot be removed")

    def bulk_update(self, *args, **kwargs):
        raise AuditWriteRefused("the audit chain head only moves forward through keyvault.audit")


class AuditChainHead(models.Model):
    """The chain's tip, one row, locked by every writer so the chain never forks."""

    id = models.PositiveSmallIntegerField(primary_key=True, default=1)
    last_sequence = models.PositiveBigIntegerField(default=0)
    last_hash = models.CharField(max_length=64)

    objects = AuditChainHeadQuerySet.as_manager()

    class Meta:
        verbose_name = "audit chain head"
        default_permissions = ()

    def save(self, *args, **kwargs):
        if not kwargs.get("force_insert"):
            raise AuditWriteRefused("the audit chain head is created once and moved only by keyvault.audit")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise AuditWriteRefused("the audit chain head cannot be removed")


class AuditPendingEvent(models.Model):
    """An audited operation's event, committed with the operation but not yet in the chain (group commit).

    Written in the caller's transaction without touching the chain head, then moved
    into the chain (sequenced, hashed, deleted from here) by
    :func:`keyvault.audit.drain_pending` in one short transaction per batch. Only
    ``keyvault.audit`` writes or removes these rows.
    """

    id = models.BigAutoField(primary_key=True)
    timestamp = models.DateTimeField("time", editable=False)
    actor = models.CharField("actor", max_length=150, editable=False)
    action = models.CharField("action", max_length=64, editable=False)
    target_type = models.CharField("target type", max_length=64, blank=True, editable=False)
    target_id = models.CharField("target", max_length=255, blank=True, editable=False)
    outcome = models.CharField("outcome", max_length=16, editable=False)
    request_id = models.CharField("request id", max_length=64, blank=True, editable=False)
    ip_address = models.GenericIPAddressField("IP address", null=True, blank=True, editable=False)
    details = models.JSONField("details", default=dict, blank=True, editable=False)
    # The event's canonical JSON cut around its previous hash and sequence (keyvault.audit._canonical_pieces),
    # computed by the writer, so the server appends outbox rows without a round trip to Python.
    canonical_pieces = models.JSONField("canonical pieces", null=True, blank=True, editable=False)

    class Meta:
        verbose_name = "pending audit event"
        default_permissions = ()


class AuditVerification(models.Model):
    """How far the console has verified the chain (one row, shared by every process): the banner's state."""

    id = models.PositiveSmallIntegerField(primary_key=True, default=1)
    anchor_sequence = models.PositiveBigIntegerField(
        "verified to", default=0, help_text="Newest event verified; page views check only the events after it.")
    anchor_hash = models.CharField("hash at the anchor", max_length=64,
                                   help_text="Re-read on every check, so a rewrite of the verified tip shows.")
    anchor_checkpoint_signature = models.CharField(
        "last checkpoint signature", max_length=128, blank=True,
        help_text="Signature of the newest checkpoint up to the anchor; the next one must chain to it.")
    checked_at = models.DateTimeField("checked at", null=True, help_text="When this status was computed.")
    pending = models.PositiveBigIntegerField("events not verified yet", default=0)
    broken_at = models.PositiveBigIntegerField("broken at", null=True, help_text="First broken event, if any.")
    reason = models.CharField("why broken", max_length=500, blank=True)
    broken_by_full_check = models.BooleanField(
        "break found by a full verification", default=False,
        help_text="Shown until a full verification passes: page views only check events after the anchor.")
    full_verified_at = models.DateTimeField("last full verification", null=True)

    class Meta:
        verbose_name = "audit chain verification status"
        default_permissions = ()


class AuditCheckpointQuerySet(AppendOnlyQuerySet):
    """Checkpoints can be read and appended, never changed or removed."""

    refusal = "audit checkpoints are append-only"


class AuditCheckpoint(models.Model):
    """An Ed25519-signed statement of the chain's position, chained like CloudTrail digests."""

    sequence = models.PositiveBigIntegerField("sequence", unique=True, help_text="Last event covered.")
    event_hash = models.CharField("event hash", max_length=64, help_text="Hash of that event.")
    signed_at = models.DateTimeField("signed at")
    public_key = models.CharField("public key", max_length=64, help_text="Hex Ed25519 public key that signed.")
    prev_signature = models.CharField("previous signature", max_length=128, blank=True)
    signature = models.CharField("signature", max_length=128, help_text="Hex Ed25519 signature.")

    objects = AuditCheckpointQuerySet.as_manager()

    class Meta:
        """Checkpoints in chain order."""

        verbose_name = "audit checkpoint"
        verbose_name_plural = "audit checkpoints"
        ordering = ["-sequence"]
        default_permissions = ("view",)

    def __str__(self) -> str:
        return f"checkpoint at #{self.sequence}"

    def save(self, *args, **kwargs):
        if self.pk is not None or not kwargs.get("force_insert"):
            raise AuditWriteRefused("audit checkpoints are written only through keyvault.audit and never changed")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise AuditWriteRefused("audit checkpoints are append-only")


class ManagedSecret(models.Model):
    """A secret Keyvault rotates or watches: where it lives, who owns it, when it expires.

    Only references and non-secret configuration are stored here; the secret value
    itself stays in its secret source (``keyvault.secrets``).
    """

    class Type(models.TextChoices):
        COOKIE_SIGNING = "cookie_signing", "Cookie-signing keys"
        DATABASE_CREDENTIAL = "database_credential", "PostgreSQL credential"
        TLS_CERTIFICATE = "tls_certificate", "TLS certificate"
        OAUTH_CLIENT_SECRET = "oauth_client_secret", "OAuth/OIDC client secret"
        VAULT_APPROLE_SECRET_ID = "vault_approle_secret_id", "Vault AppRole secret id"
        API_CLIENT_TOKEN = "api_client_token", "Keyvault API client token"
        GENERIC = "generic", "Generic secret"

    class Status(models.TextChoices):
        ACTIVE = "active", "Active"
        ROTATING = "rotating", "Rotating"
        EXPIRING = "expiring", "Expiring soon"
        OVERDUE = "overdue", "Rotation overdue"
        EXPIRED = "expired", "Expired"
        FAILED = "failed", "Last rotation failed"

    #: Config keys that would hold a secret: configuration is shown in the console, so they are refused.
    FORBIDDEN_CONFIG_KEYS = ("password", "secret", "private_key", "token", "client_secret", "api_key")

    name = models.SlugField(
        "name", max_length=100, unique=True, help_text="Unique name used in the console and the CLI (--secret NAME)."
    )
    secret_type = models.CharField(
        "type", max_length=32, choices=Type.choices, db_index=True,
        help_text="Decides which rotation executor and runbook apply.",
    )
    source = models.CharField(
        "secret source", max_length=32,
        help_text="Name of the configured secret source holding the value (file, env, vault, aws, gcp, k8s).",
    )
    path = models.CharField(
        "path / ARN / name", max_length=1024,
        help_text="Where the secret lives in its source: a path, an ARN or a secret name.",
    )
    owner = models.CharField("owner / team", max_length=150, blank=True, help_text="Who is told about expiry and failures.")
    description = models.TextField("purpose", blank=True, help_text="What uses this secret.")
    config = models.JSONField(
        "configuration", default=dict, blank=True,
        help_text="Non-secret, type-specific settings: DB host/port/dbname/usernames, TLS endpoint host:port, "
        "OAuth token endpoint and client id. Never put a secret here.",
    )
    metadata = models.JSONField(
        "observed metadata", default=dict, blank=True, editable=False,
        help_text="What Keyvault last read about the secret (for certificates: subject, SANs, issuer, key type).",
    )
    status = models.CharField(
        "status", max_length=16, choices=Status.choices, default=Status.ACTIVE, db_index=True,
        help_text="Set by rotation runs and the daily expiry check.",
    )
    last_rotated_at = models.DateTimeField("last rotated", null=True, blank=True)
    expires_at = models.DateTimeField(
        "expires", null=True, blank=True, db_index=True,
        help_text="When the secret stops working (TLS: the certificate's notAfter, read from the certificate).",
    )
    warn_before = models.DurationField(
        "warn before expiry", null=True, blank=True,
        help_text="Flag the secret this long before it expires (empty: 30 days for TLS certificates, 14 days otherwise).",
    )
    last_flagged_at = models.DateTimeField(
        "last reminder", null=True, blank=True, help_text="When the daily check last reported this secret."
    )
    created_at = models.DateTimeField("created", auto_now_add=True)
    updated_at = models.DateTimeField("updated", auto_now=True)

    class Meta:
        """Secrets are listed by name; rotating them is a separate permission."""

        verbose_name = "managed secret"
        verbose_name_plural = "managed secrets"
        ordering = ["name"]
        default_permissions = ("add", "change", "view")
        permissions = [("rotate_managedsecret", "Can start rotations of managed secrets")]

    def __str__(self) -> str:
        return f"{self.name} ({self.get_secret_type_display()})"

    def clean(self) -> None:
        from django.core.exceptions import ValidationError

        if not isinstance(self.config, dict):
            raise ValidationError({"config": "Configuration is a JSON object."})
        bad = sorted(_secret_like_keys(self.config, self.FORBIDDEN_CONFIG_KEYS))
        if bad:
            raise ValidationError(
                {"config": f"Configuration is not secret and is shown in the console; remove {', '.join(bad)} "
                           "(store the value in a secret source and reference it)."}
            )

    @property
    def effective_warn_before(self):
        from datetime import timedelta

        if self.warn_before is not None:
            return self.warn_before
        return timedelta(days=30 if self.secret_type == self.Type.TLS_CERTIFICATE else 14)


def _secret_like_keys(value, forbidden, prefix: str = "") -> list[str]:
    found = []
    if isinstance(value, dict):
        for key, item in value.items():
            lowered = str(key).lower()
            if any(lowered == word or lowered.endswith("_" + word) for word in forbidden):
                found.append(prefix + str(key))
            found.extend(_secret_like_keys(item, forbidden, prefix + str(key) + "."))
    elif isinstance(value, list):
        for item in value:
            found.extend(_secret_like_keys(item, forbidden, prefix))
    return found


from django.conf import settings  # noqa: E402 - kept beside the one model that needs it


class SiemConsumer(models.Model):
    """A SIEM collector (Splunk, Elastic…) allowed to pull the audit log over HTTP with its own token.

    Only the SHA-256 of the token is stored: the token is shown once, when the
    consumer is created. Deactivating a consumer makes its token answer 401.
    """

    name = models.SlugField(
        "name", max_length=100, unique=True, help_text="Which collector this is, e.g. splunk-prod."
    )
    token_hash = models.CharField(
        "token SHA-256", max_length=64, unique=True, editable=False,
        help_text="SHA-256 (hex) of the bearer token; the token itself is never stored.",
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+",
        editable=False,
        verbose_name="created by",
    )
    created_at = models.DateTimeField("created", auto_now_add=True)
    last_used_at = models.DateTimeField(
        "last used", null=True, blank=True, editable=False, help_text="When the collector last pulled events."
    )
    last_sequence = models.PositiveBigIntegerField(
        "last sequence delivered", default=0, editable=False,
        help_text="The highest audit event sequence the collector has been sent.",
    )
    active = models.BooleanField("active", default=True, help_text="Inactive consumers' tokens are refused (401).")

    class Meta:
        """Managed by key administrators; never deleted, only deactivated (the audit log names them)."""

        verbose_name = "SIEM consumer"
        verbose_name_plural = "SIEM consumers"
        ordering = ["name"]
        default_permissions = ("add", "change", "view")

    def __str__(self) -> str:
        return self.name
