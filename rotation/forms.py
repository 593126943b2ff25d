"""Forms of the rotation console: starting runs, deciding on them, stopping them, policies.

They only validate input; the admin views hand the cleaned data to
``rotation.services``, which do the work and write the audit events.
"""

from __future__ import annotations

from datetime import timedelta

from django import forms
from django.conf import settings
from django.core.exceptions import ValidationError

from keyvault.models import KeyEncryptionKey
from rotation.models import MIN_PERIOD, Approval, ProviderRateLimit, RotationPolicy, format_period, parse_period


def _text(label: str, help_text: str, *, required: bool = False, rows: int = 3) -> forms.CharField:
    return forms.CharField(
        label=label, required=required, max_length=2000, help_text=help_text,
        error_messages={"required": f"{label} is required."},
        widget=forms.Textarea(attrs={"rows": rows, "cols": 60}),
    )


class KEKRunForm(forms.Form):
    """Base of the forms that start a run on one KEK (the KEK action views pass ``kek``)."""

    def __init__(self, *args, kek: KeyEncryptionKey, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.kek = kek


class StartRotationForm(KEKRunForm):
    """An on-demand rotation: a new primary version, every data key rewrapped, old versions retired."""

    reason = _text("Reason", "Recorded on the run and in the audit log, e.g. a change ticket.")


class EmergencyRotationForm(KEKRunForm):
    """A rotation after a suspected compromise: an incident reference is required."""

    incident_ref = forms.CharField(
        label="Incident / ticket", max_length=100,
        error_messages={"required": "An emergency rotation needs an incident or ticket reference."},
        help_text="Required. The incident this rotation answers, e.g. INC-1234.",
    )
    reason = _text("What happened", "Recorded on the run and in the audit log.")

    def clean_incident_ref(self) -> str:
        value = self.cleaned_data["incident_ref"].strip()
        if not value:
            raise ValidationError("An emergency rotation needs an incident or ticket reference.", code="required")
        return value


class MigrateForm(KEKRunForm):
    """Move every data key of this KEK to another enabled KEK."""

    destination = forms.ModelChoiceField(
        label="Destination KEK", queryset=KeyEncryptionKey.objects.none(),
        help_text="An enabled KEK, usually on another provider. Data keys are unwrapped and rewrapped by the worker.",
    )
    reason = _text("Reason", "Recorded on the run and in the audit log.")

    def __init__(self, *args, kek: KeyEncryptionKey, **kwargs) -> None:
        super().__init__(*args, kek=kek, **kwargs)
        self.fields["destination"].queryset = (
            KeyEncryptionKey.objects.filter(state=KeyEncryptionKey.State.ENABLED).exclude(pk=kek.pk).order_by("name")
        )
        self.fields["destination"].label_from_instance = lambda other: f"{other.name} ({other.provider})"


class DecisionForm(forms.Form):
    """Approve or reject a run waiting for approval; a comment is always required."""

    decision = forms.ChoiceField(
        label="Decision", choices=Approval.Decision.choices, initial=Approval.Decision.APPROVE,
        widget=forms.RadioSelect,
    )
    comment = _text("Comment", "Required. Why you approve or reject (recorded in the audit log).", required=True)
    comment.error_messages["required"] = "A comment is required."
    break_glass = forms.BooleanField(
        label="Break glass", required=False,
        help_text="Bypass the approvals still missing. Audited as a break-glass decision; use only in an emergency.",
    )

    def __init__(self, *args, allow_break_glass: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not allow_break_glass:
            del self.fields["break_glass"]

    def clean_comment(self) -> str:
        comment = self.cleaned_data["comment"].strip()
        if not comment:
            raise ValidationError("A comment is required.", code="required")
        return comment


class RunControlForm(forms.Form):
    """Cancel, roll back or resume a run; the reason is recorded."""

    reason = _text("Reason", "Recorded in the audit log.")


class TickStepForm(forms.Form):
    """A person confirms a manual runbook step."""

    evidence = _text("Evidence", "What you checked and how (command output, ticket, who you told).", rows=4)


class PeriodField(forms.CharField):
    """A duration typed as ``90d``, ``12h``, ``5m``, ``2w`` or ISO 8601 (``P90D``)."""

    def __init__(self, *, minimum: timedelta, **kwargs) -> None:
        # No max_length: its validator would run on the parsed timedelta; the widget limits typing instead.
        super().__init__(**kwargs)
        self.widget.attrs.setdefault("maxlength", "40")
        self.minimum = minimum

    def prepare_value(self, value):
        return format_period(value) if isinstance(value, timedelta) else value

    def to_python(self, value) -> timedelta | None:
        value = super().to_python(value)
        if value in self.empty_values:
            return None
        try:
            period = parse_period(value)
        except ValueError:
            raise ValidationError(
                "Not a duration: use e.g. 90d, 12h, 5m, 2w or P90D.", code="invalid"
            ) from None
        if period < self.minimum:
            raise ValidationError(
                "At least %(minimum)s.", code="min_value", params={"minimum": format_period(self.minimum)}
            )
        return period


class RotationPolicyForm(forms.ModelForm):
    """The policy's settings; saved through ``rotation.services.update_policy``."""

    period = PeriodField(
        label="Period", minimum=MIN_PERIOD,
        help_text="Rotate this long after the last rotation: 90d, 12h, 5m (drills), 2w or P90D. "
        "NIST SP 800-57 suggests at most about 2 years (730d) for KEKs.",
    )
    grace_period = PeriodField(
        label="Grace period", minimum=timedelta(0),
        help_text="Old versions stay enabled this long after every data key is rewrapped (e.g. 7d; 0s for none).",
    )
    approvals_required = forms.TypedChoiceField(
        label="Approvals required", coerce=int, choices=[(0, "0 — none"), (1, "1 person"), (2, "2 people")],
        help_text="Distinct approvers a run needs before it starts; never the initiator.",
    )

    class Meta:
        model = RotationPolicy
        fields = ("period", "grace_period", "approvals_required", "auto", "usage_threshold",
                  "window_weekdays", "window_start", "window_end")


class ProviderRateLimitForm(forms.ModelForm):
    """A provider's cap on rotation calls per second; the admin saves it through ``services.set_rate_limit``."""

    provider = forms.ChoiceField(label="Provider", choices=())

    class Meta:
        model = ProviderRateLimit
        fields = ("provider", "cap")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        names = sorted(set(settings.KMS.get("providers", {})) | {self.instance.provider} - {""})
        self.fields["provider"].choices = [(name, name) for name in names]
        if self.instance.pk:
            self.fields["provider"].disabled = True
