from django.apps import AppConfig
from django.core.signals import setting_changed


def _kms_config() -> dict:
    from django.conf import settings

    return settings.KMS


def _reset_on_kms_change(*, setting: str, **kwargs) -> None:
    from keyvault.kms import reset_providers

    if setting == "KMS":
        reset_providers()


class KeyvaultConfig(AppConfig):
    """Keys, data keys, audit log and the console."""

    name = "keyvault"
    verbose_name = "Keyvault"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from keyvault.kms import set_config_loader

        set_config_loader(_kms_config)
        setting_changed.connect(_reset_on_kms_change, dispatch_uid="keyvault.kms.reset")
