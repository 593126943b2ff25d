"""The console's roles, as groups with exact permissions.

Patterns are ``app_label.codename`` with shell wildcards. The groups are created
by a data migration and re-synced after every ``migrate`` (``post_migrate``), so
permissions added by later migrations reach the right roles and nothing else.
A superuser is for bootstrap only.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

KEY_ADMINISTRATORS = "Key administrators"
KEY_OPERATORS = "Key operators"
AUDITORS = "Auditors"

ROLES: dict[str, tuple[str, ...]] = {
    KEY_ADMINISTRATORS: ("keyvault.*", "rotation.*"),
    KEY_OPERATORS: (
        "keyvault.view_*",
        "keyvault.rotate_keyencryptionkey",
        "keyvault.add_datakey",
        "keyvault.rotate_managedsecret",
        "rotation.view_*",
        "rotation.add_rotationrun",
        "rotation.approve_rotationrun",
        "rotation.tick_runstep",
    ),
    AUDITORS: ("keyvault.view_*", "keyvault.export_auditevent", "rotation.view_*"),
}


#: Never part of a role, whatever the patterns say: second factors are the superuser's (a lost phone),
#: and a role that could delete a colleague's device could make them enrol one it sees.
NOT_IN_ANY_ROLE = ("keyvault.*_totpdevice",)


def permission_matches(app_label: str, codename: str, patterns: tuple[str, ...]) -> bool:
    label = f"{app_label}.{codename}"
    if any(fnmatchcase(label, pattern) for pattern in NOT_IN_ANY_ROLE):
        return False
    return any(fnmatchcase(label, pattern) for pattern in patterns)


def sync_roles(group_model, permission_model) -> None:
    """Create the role groups and set their permissions to exactly what ``ROLES`` says."""
    permissions = list(
        permission_model.objects.filter(content_type__app_label__in=("keyvault", "rotation")).select_related(
            "content_type"
        )
    )
    for role, patterns in ROLES.items():
        group, _ = group_model.objects.get_or_create(name=role)
        wanted = [p for p in permissions if permission_matches(p.content_type.app_label, p.codename, patterns)]
        group.permissions.set(wanted)


def sync_roles_after_migrate(sender, *, apps=None, **kwargs) -> None:
    """``post_migrate`` receiver; permissions are created by auth's own receiver first."""
    if apps is None:
        from django.apps import apps
    try:
        group_model = apps.get_model("auth", "Group")
        permission_model = apps.get_model("auth", "Permission")
    except LookupError:
        return
    from keyvault.access.accounts import syncing_roles  # accounts needs the models loaded; roles is read by migrations

    with syncing_roles():
        sync_roles(group_model, permission_model)
