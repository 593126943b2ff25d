from django.apps import AppConfig
from django.core.signals import setting_changed


def _kms_config() -> dict:
    from django.conf import settings

    return settings.KMS


def _reset_on_kms_change(*, setting: str, **kwargs) -> None:
    from keyvault.kms import reset_providers

    if setting == "KMS":
        reset_providers()


def _secret_sources_config() -> dict:
    from django.conf import settings

    return settings.SECRET_SOURCES


def _reset_on_secret_sources_change(*, setting: str, **kwargs) -> None:
    from keyvault.secrets import reset_sources

    if setting == "SECRET_SOURCES":
        reset_sources()


class KeyvaultConfig(AppConfig):
    """Keys, data keys, audit log and the console."""

    name = "keyvault"
    verbose_name = "Keyvault"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.db.models.signals import post_migrate

        from keyvault import checks  # noqa: F401  (registers the deploy checks)
        from keyvault.access.roles import sync_roles_after_migrate
        from keyvault.audit import checks as audit_checks  # noqa: F401  (registers the audit-table ownership check)
        from keyvault.kms import set_config_loader

        set_config_loader(_kms_config)
        from keyvault import secrets

        secrets.set_config_loader(_secret_sources_config)
        setting_changed.connect(_reset_on_secret_sources_change, dispatch_uid="keyvault.secrets.reset")
        setting_changed.connect(_reset_on_kms_change, dispatch_uid="keyvault.kms.reset")
        # After auth's own receiver (it is connected first) has created the permissions.
        post_migrate.connect(sync_roles_after_migrate, dispatch_uid="keyvault.access.roles.sync")
        from keyvault.access import accounts

        accounts.connect_signals()  # every change to users, groups, devices, SIEM consumers is audited
