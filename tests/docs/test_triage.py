"""The triage page and the feature card point where they should, and the staffing rules
they state are the ones the code enforces."""

from __future__ import annotations

import re

from django.conf import settings

from keyvault.access.roles import KEY_ADMINISTRATORS, KEY_OPERATORS, ROLES, permission_matches
from rotation.models import RotationPolicy
from rotation.permissions import APPROVE_RUN, EMERGENCY_RUN
from tests.docs.examples import ROOT

TRIAGE = ROOT / "docs" / "ops" / "triage.md"
SEC_002 = ROOT / "docs" / "design" / "features" / "SEC-002-secret-management.md"
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)\s]*)?\)")


def linked_files(path) -> set[str]:
    return {(path.parent / target).resolve().relative_to(ROOT).as_posix() for target in LINK.findall(path.read_text())
            if not re.match(r"^[a-z]+:", target)}


def test_the_feature_card_links_both_runbooks_and_the_triage_page():
    assert {"docs/ops/secrets.md", "docs/ops/key-rotation.md", "docs/ops/triage.md"} <= linked_files(SEC_002)


def test_the_triage_page_is_linked_from_the_operator_docs():
    for doc in ("docs/ops/key-rotation.md", "docs/ops/production.md", "docs/design/architecture.md"):
        assert "docs/ops/triage.md" in linked_files(ROOT / doc), doc


def test_the_staffing_table_covers_every_approval_count_a_policy_allows():
    field = RotationPolicy._meta.get_field("approvals_required")
    allowed = range(0, max(v.limit_value for v in field.validators if hasattr(v, "limit_value")) + 1)
    section = TRIAGE.read_text().split("## Approver staffing and break-glass", 1)[1].split("\n## ", 1)[0]
    rows = [int(number) for number in re.findall(r"^\| (\d) \|", section, re.MULTILINE)]
    assert rows == list(allowed)


def _role_may(role: str, permission: str) -> bool:
    app_label, codename = permission.split(".")
    return permission_matches(app_label, codename, ROLES[role])


def test_the_roles_the_page_names_hold_the_permissions_it_says():
    text = " ".join(TRIAGE.read_text().split())
    assert f"`{EMERGENCY_RUN}`: *Key administrators* only" in text
    assert _role_may(KEY_ADMINISTRATORS, EMERGENCY_RUN) and not _role_may(KEY_OPERATORS, EMERGENCY_RUN)
    assert f"`{APPROVE_RUN}`: the roles *Key operators* and *Key administrators*" in text
    assert _role_may(KEY_OPERATORS, APPROVE_RUN) and _role_may(KEY_ADMINISTRATORS, APPROVE_RUN)
    assert f"default `{settings.ROTATION_BREAK_GLASS_GROUP}`" in text
