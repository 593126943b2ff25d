"""Forms of the security console's key actions.

They only validate input; the admin views hand the cleaned data to
``keyvault.keys.services``, which do the work and write the audit events.
"""

from __future__ import annotations

from django import forms
from django.core.exceptions import ValidationError

from keyvault.keys import services
from keyvault.kms.registry import default_provider_name, provider_names
from keyvault.models import DataKey, KeyEncryptionKey, KeyVersion

#: Google Cloud KMS's longest rotation period (876,000 hours); longer makes no sense.
MAX_ROTATION_PERIOD_DAYS = 36_500
#: NIST SP 800-38D: at most 2^32 random-nonce AES-GCM encryptions per key.
MAX_ENCRYPTIONS_PER_VERSION = 2**32


def _reason_field(help_text: str) -> forms.CharField:
    return forms.CharField(
        label="Reason",
        required=False,
        max_length=500,
        widget=forms.Textarea(attrs={"rows": 3, "cols": 60}),
        help_text=help_text,
    )


class CreateKEKForm(forms.Form):
    """A new KEK: where its material lives and how often it rotates."""

    name = forms.RegexField(
        label="Name",
        max_length=100,
        # A slug that starts with a letter or digit, so every provider accepts it as a key id.
        regex=r"^[A-Za-z0-9][A-Za-z0-9_-]*$",
        error_messages={"invalid": "Use letters, digits, hyphens and underscores, starting with a letter or digit."},
        help_text="Unique name used in the console, the CLI and the API. It cannot be changed later.",
    )
    provider = forms.ChoiceField(label="Provider", help_text="The configured KMS provider that holds the key material.")
    description = forms.CharField(
        label="Purpose",
        required=False,
        widget=forms.Textarea(attrs={"rows": 3, "cols": 60}),
        help_text="What this key protects and who owns it.",
    )
    rotation_period_days = forms.IntegerField(
        label="Rotation period (days)",
        min_value=1,
        max_value=MAX_ROTATION_PERIOD_DAYS,
        initial=365,
        help_text="A new version is made this many days after the last rotation. It becomes the key's rotation "
        "policy, where it can be changed later (to hours or minutes for drills, too).",
    )
    max_encryptions_per_version = forms.IntegerField(
        label="Max encryptions per version",
        required=False,
        min_value=1,
        max_value=MAX_ENCRYPTIONS_PER_VERSION,
        help_text="Rotate once the primary version has encrypted this many times (empty: no usage trigger).",
    )

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        names = provider_names()
        self.fields["provider"].choices = [(name, name) for name in names]
        default = default_provider_name()
        if default in names:
            self.fields["provider"].initial = default

    def clean_name(self) -> str:
        name = self.cleaned_data["name"]
        if KeyEncryptionKey.objects.filter(name=name).exists():
            raise ValidationError("A key-encryption key with this name already exists.", code="duplicate")
        return name


class KEKActionForm(forms.Form):
    """Base of the forms for one action on one KEK."""

    def __init__(self, *args, kek: KeyEncryptionKey, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.kek = kek


class ConfirmForm(KEKActionForm):
    """An action without options: the POST itself is the confirmation."""


class DisableForm(KEKActionForm):
    reason = _reason_field(
        "Recorded in the audit log. Every encrypt and decrypt with this key fails until it is enabled."
    )


def _require_typed_name(form: KEKActionForm, field: str) -> str:
    typed = form.cleaned_data.get(field, "")
    if typed != form.kek.name:
        raise ValidationError(
            "The name you typed does not match this key's name; type %(name)s exactly.",
            code="confirmation_mismatch",
            params={"name": form.kek.name},
        )
    return typed


class ScheduleDeletionForm(KEKActionForm):
    """Deletion waits 7-30 days, as AWS KMS; the operator types the key's name to confirm."""

    waiting_days = forms.IntegerField(
        label="Waiting period (days)",
        min_value=services.MIN_DELETION_WAIT_DAYS,
        max_value=services.MAX_DELETION_WAIT_DAYS,
        initial=services.DEFAULT_DELETION_WAIT_DAYS,
        help_text=(
            f"{services.MIN_DELETION_WAIT_DAYS}-{services.MAX_DELETION_WAIT_DAYS} days. The key refuses all "
            "cryptography at once; until the date passes the deletion can be cancelled."
        ),
    )
    confirm_name = forms.CharField(
        label="Type the key's name to confirm",
        max_length=100,
        widget=forms.TextInput(attrs={"autocomplete": "off", "spellcheck": "false"}),
    )

    def clean_confirm_name(self) -> str:
        return _require_typed_name(self, "confirm_name")


class RetireVersionForm(KEKActionForm):
    """Disable or destroy (or re-enable) one non-primary version."""

    state = forms.ChoiceField(label="New state", widget=forms.RadioSelect)
    reason = _reason_field("Recorded in the audit log.")
    confirm_name = forms.CharField(
        label="Type the key's name to confirm destruction",
        max_length=100,
        required=False,
        widget=forms.TextInput(attrs={"autocomplete": "off", "spellcheck": "false"}),
        help_text="Needed only to destroy the version: destroyed material cannot be restored.",
    )

    def __init__(self, *args, kek: KeyEncryptionKey, version: KeyVersion, **kwargs) -> None:
        super().__init__(*args, kek=kek, **kwargs)
        self.version = version
        states = [KeyVersion.State.DISABLED, KeyVersion.State.DESTROYED]
        if version.state == KeyVersion.State.DISABLED:
            states = [KeyVersion.State.ENABLED, KeyVersion.State.DESTROYED]
        self.fields["state"].choices = [(state.value, state.label) for state in states]
        self.fields["state"].initial = states[0].value

    def clean(self) -> dict:
        cleaned = super().clean()
        if cleaned.get("state") == KeyVersion.State.DESTROYED:
            try:
                _require_typed_name(self, "confirm_name")
            except ValidationError as error:
                self.add_error("confirm_name", error)
        return cleaned


class DestroyDataKeyForm(forms.Form):
    """Destroy a superseded data key: its replacement, a reason, and its id typed again."""

    replaced_by = forms.IntegerField(
        label="Replaced by data key",
        min_value=1,
        help_text="The id of the newer data key of the same owner that now encrypts its data. It must open.",
    )
    reason = forms.CharField(
        label="Reason",
        max_length=500,
        widget=forms.Textarea(attrs={"rows": 3, "cols": 60}),
        help_text="Incident or ticket; recorded in the audit log.",
    )
    confirm = forms.CharField(
        label="Type the data key's id to confirm",
        max_length=20,
        widget=forms.TextInput(attrs={"autocomplete": "off", "spellcheck": "false"}),
        help_text="Destruction is final: nobody can unwrap this data key through Keyvault again.",
    )

    def __init__(self, *args, data_key: DataKey, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.data_key = data_key

    def clean_confirm(self) -> str:
        typed = self.cleaned_data["confirm"].strip().lstrip("#")
        if typed != str(self.data_key.pk):
            raise ValidationError(f"Type {self.data_key.pk} to confirm.")
        return typed

    def clean_replaced_by(self) -> DataKey:
        replacement = DataKey.objects.select_related("kek").filter(pk=self.cleaned_data["replaced_by"]).first()
        if replacement is None:
            raise ValidationError("There is no data key with that id.")
        return replacement
