"""Audit events are built by the named constructors of ``keyvault.audit.events``, and only there.

The details an event carries are a stored format (the chain's hashes, the SIEM feed,
reports and exports read them), so the shapes below are written out in full.
"""

from __future__ import annotations

import ast
import inspect
from datetime import UTC, datetime
from pathlib import Path

import pytest

from keyvault import audit
from keyvault.audit import Action, Actor, Outcome, events
from keyvault.keys import services
from keyvault.models import AuditEvent

ROOT = Path(__file__).resolve().parents[3]
AUDIT_PACKAGE = ROOT / "keyvault" / "audit"
AUDIT_MODULE = "keyvault.audit"


# -- nobody outside keyvault/audit/ calls audit.record ----------------------------------------


def _module_of(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def ad_hoc_records(source: str, module: str, *, is_package: bool = False) -> list[int]:
    """Lines of ``source`` that reach ``keyvault.audit.record``: ``audit.record`` under any alias, or importing it."""
    tree = ast.parse(source)
    aliases: set[str] = set()  # names bound to the keyvault.audit module
    dotted = False  # ``import keyvault.audit`` binds ``keyvault``: look for keyvault.audit.record
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == AUDIT_MODULE:
                    if alias.asname:
                        aliases.add(alias.asname)
                    else:
                        dotted = True
        elif isinstance(node, ast.ImportFrom):
            source_module = _absolute(node, module, is_package)
            for alias in node.names:
                if source_module == "keyvault" and alias.name == "audit":
                    aliases.add(alias.asname or "audit")
                elif source_module == AUDIT_MODULE and alias.name in ("record", "*"):
                    lines.append(node.lineno)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or node.attr != "record":
            continue
        owner = node.value
        if isinstance(owner, ast.Name) and owner.id in aliases:
            lines.append(node.lineno)
        elif (dotted and isinstance(owner, ast.Attribute) and owner.attr == "audit"
              and isinstance(owner.value, ast.Name) and owner.value.id == "keyvault"):
            lines.append(node.lineno)
    return sorted(lines)


@pytest.mark.parametrize("source", [
    "from keyvault import audit\naudit.record(audit.Action.OTHER, actor=None)\n",
    "from keyvault import audit as chain\ndef f():\n    return chain.record\n",
    "import keyvault.audit\nkeyvault.audit.record('other', actor=None)\n",
    "import keyvault.audit as kva\nkva.record('other', actor=None)\n",
    "def f():\n    from keyvault.audit import record as write\n    write('other', actor=None)\n",
    "from .. import audit\naudit.record('other', actor=None)\n",
])
def test_the_scan_finds_every_spelling_of_an_ad_hoc_record(source):
    assert ad_hoc_records(source, "keyvault.keys.services")


def test_the_scan_leaves_other_records_alone():
    source = ("from keyvault import audit\nfrom keyvault.audit import events\n"
              "events.kek_enabled(None, actor=None)\naudit.hmac_value('x')\nself.record(1)\n")

    assert ad_hoc_records(source, "keyvault.keys.services") == []


def test_only_the_audit_package_calls_audit_record():
    found = []
    for package in ("keyvault", "rotation"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if AUDIT_PACKAGE in path.parents:
                continue
            lines = ad_hoc_records(path.read_text(), _module_of(path), is_package=path.name == "__init__.py")
            found += [f"{path.relative_to(ROOT)}:{line}" for line in lines]

    assert found == [], "call a constructor of keyvault.audit.events instead of audit.record"


def _records_in(path: Path) -> set[str]:
    """The actions a module of the audit package passes to ``record(...)`` itself."""
    actions = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name | ast.Attribute)
                and getattr(node.func, "id", getattr(node.func, "attr", None)) == "record" and node.args
                and isinstance(node.args[0], ast.Attribute) and node.args[0].attr in Action.__members__):
            actions.add(Action[node.args[0].attr].value)
    return actions


def test_inside_the_audit_package_only_the_chain_records_its_own_events():
    """The chain records its checkpoints and log exports itself (events.py builds on it, so it cannot use events)."""
    callers = {path.name for path in AUDIT_PACKAGE.glob("*.py")
               if path.name != "events.py" and ad_hoc_records(path.read_text(), _module_of(path),
                                                              is_package=path.name == "__init__.py")}

    assert callers == set()  # nobody in the package reaches record through the ``audit`` module name...
    assert _records_in(AUDIT_PACKAGE / "__init__.py") == {Action.AUDIT_CHECKPOINT, Action.AUDIT_EXPORTED}
    assert all(not _records_in(path) for path in AUDIT_PACKAGE.glob("*.py")
               if path.name not in ("__init__.py", "events.py"))  # ...nor by calling it bare


# -- every action in use has a constructor ------------------------------------------------------


def actions_in_use() -> set[str]:
    """Every ``Action.X`` the code names (records, queries, tables), outside the enum's own definition."""
    used = set()
    for package in ("keyvault", "rotation"):
        for path in (ROOT / package).rglob("*.py"):
            if "migrations" in path.parts or path == ROOT / "keyvault" / "models" / "core.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Attribute) and node.attr in Action.__members__
                        and isinstance(node.value, ast.Name | ast.Attribute)
                        and getattr(node.value, "id", getattr(node.value, "attr", None)) == "Action"):
                    used.add(Action[node.attr].value)
    return used


def test_every_action_the_code_uses_has_a_constructor():
    used = actions_in_use()
    recorded_by_the_chain = _records_in(AUDIT_PACKAGE / "__init__.py")

    assert len(used) > 30  # the scan sees the code
    assert used - recorded_by_the_chain - set(events.CONSTRUCTORS) == set()


def test_every_constructor_says_when_it_is_emitted_and_takes_its_fields_by_keyword():
    constructors = [constructor for group in events.CONSTRUCTORS.values() for constructor in group]

    assert len(constructors) >= len(events.CONSTRUCTORS) > 30
    for constructor in constructors:
        doc = (constructor.__doc__ or "").strip()
        assert doc and "\n" not in doc, f"{constructor.__name__}: one line saying when it is emitted"
        parameters = inspect.signature(constructor).parameters.values()
        positional = [p.name for p in parameters if p.kind is not inspect.Parameter.KEYWORD_ONLY]
        assert len(positional) <= 1, f"{constructor.__name__}: fields are keyword-only, got {positional}"
        assert "actor" in inspect.signature(constructor).parameters


def test_an_unknown_field_is_refused_not_recorded(db):
    before = AuditEvent.objects.count()

    with pytest.raises(TypeError):
        events.rotation_started(("keyencryptionkey", "k"), actor=Actor.system("tests"), run_id=1, kind="scheduled",
                                reason="", incident_ref="", approvals_required=0, destinaton="typo")
    assert AuditEvent.objects.count() == before


# -- the details each event carries ------------------------------------------------------------


@pytest.fixture
def kek(system_actor):
    return services.create_kek(name="payments", actor=system_actor)


def _stored(event) -> AuditEvent:
    """The event as read back, hash checked: what the SIEM and the exports see."""
    stored = AuditEvent.objects.get(pk=event.pk)
    assert audit.event_hash(stored) == stored.hash
    return stored


@pytest.mark.django_db
def test_kek_rotated_carries_reason_and_run_only_when_given(kek, system_actor):
    plain = _stored(events.kek_rotated(kek, actor=system_actor, new_version=2, previous_version=1))
    in_run = _stored(events.kek_rotated(kek, actor=system_actor, new_version=3, previous_version=None,
                                        reason="scheduled", run_id=7))

    assert (plain.action, plain.target_type, plain.target_id) == ("kek.rotated", "keyencryptionkey", "payments")
    assert plain.details == {"new_version": 2, "previous_version": 1}
    assert in_run.details == {"new_version": 3, "previous_version": None, "reason": "scheduled", "run_id": 7}


@pytest.mark.django_db
def test_a_real_rotation_records_the_same_shape(kek, system_actor):
    services.rotate_kek_version(kek, actor=system_actor, reason="by hand")

    event = AuditEvent.objects.filter(action=Action.KEK_ROTATED).get()
    assert event.details == {"new_version": 2, "previous_version": 1, "reason": "by hand"}
    assert event.actor == system_actor.name and event.outcome == Outcome.SUCCESS


@pytest.mark.django_db
def test_kek_settings_changed_records_only_the_fields_that_changed(kek, system_actor):
    event = _stored(events.kek_settings_changed(kek, actor=system_actor, max_encryptions_per_version=None,
                                                next_rotation_at="2030-01-01T00:00:00+00:00"))

    assert event.action == "kek.updated"
    assert event.details == {"max_encryptions_per_version": None, "next_rotation_at": "2030-01-01T00:00:00+00:00"}


@pytest.mark.django_db
def test_rotation_started_keeps_the_drivers_fields(kek, system_actor):
    event = _stored(events.rotation_started(kek, actor=system_actor, run_id=4, kind="scheduled", reason="due",
                                            incident_ref="", approvals_required=0, destination=None))

    assert event.action == "rotation.started" and event.target_id == "payments"
    assert event.details == {"run_id": 4, "kind": "scheduled", "reason": "due", "incident_ref": "",
                             "approvals_required": 0, "destination": None}


@pytest.mark.django_db
def test_a_failed_batch_is_a_failure_naming_ids_and_errors(kek, system_actor):
    clean = _stored(events.batch_rewrapped(kek, actor=system_actor, run_id=4, first_id=1, last_id=9, rewrapped=9))
    failed = _stored(events.batch_rewrapped(kek, actor=system_actor, run_id=4, first_id=10, last_id=19, rewrapped=8,
                                         failed_ids=[12, 15], failed_errors=["InvalidCiphertext"]))

    assert clean.outcome == "success"
    assert clean.details == {"run_id": 4, "first_id": 1, "last_id": 9, "rewrapped": 9}
    assert failed.outcome == "failure"
    assert failed.details == {"run_id": 4, "first_id": 10, "last_id": 19, "rewrapped": 8, "failed_ids": [12, 15],
                              "failed_errors": ["InvalidCiphertext"]}


@pytest.mark.django_db
def test_run_state_changes_cut_the_note_and_mark_failures(system_actor):
    event = _stored(events.run_state_changed(("keyencryptionkey", "payments"), actor=system_actor, run_id=3,
                                             from_state="rewrapping", to_state="failed", note="x" * 600, failed=True))

    assert event.action == "rotation.state_changed" and event.outcome == "failure"
    assert event.details == {"run_id": 3, "from": "rewrapping", "to": "failed", "note": "x" * 500}


@pytest.mark.django_db
def test_secret_events_name_their_event_inside_the_details(system_actor):
    from keyvault.models import ManagedSecret

    secret = ManagedSecret.objects.create(name="billing-db", secret_type="database_credential", source="file",
                                          path="x/billing")
    failed = _stored(events.secret_rotation_failed(secret, actor=system_actor, run_id=5, error="E" * 600,
                                                   recovery="the old credential was not changed"))
    repointed = _stored(events.secret_changed(secret, actor=system_actor, repointed=True,
                                              changes={"path": {"before": "BILLING", "after": "OTHER"}}))

    assert (failed.action, failed.target_type, failed.target_id, failed.outcome) == (
        "secret", "managedsecret", "billing-db", "failure")
    assert failed.details == {"event": "rotation_failed", "run_id": 5, "error": "E" * 500,
                              "recovery": "the old credential was not changed"}
    assert repointed.details == {"event": "repointed", "changes": {"path": {"before": "BILLING", "after": "OTHER"}},
                                 "next_run_needs_approval": True}


@pytest.mark.django_db
def test_account_events_carry_before_after_and_what_changed(system_actor):
    changed = _stored(events.ACCOUNT_EVENTS[Action.USER_CHANGED](
        ("user", "alice"), actor=system_actor, changed=["is_staff"], before={"is_staff": False},
        after={"is_staff": True}))
    created = _stored(events.group_created(("group", "Auditors"), actor=system_actor, before=None,
                                           after={"name": "Auditors"}))

    assert changed.action == "user.changed"
    assert changed.details == {"changed": ["is_staff"], "before": {"is_staff": False}, "after": {"is_staff": True}}
    assert created.action == "group.created" and created.details == {"before": None, "after": {"name": "Auditors"}}
    assert set(events.ACCOUNT_EVENTS) == {
        Action.USER_CREATED, Action.USER_CHANGED, Action.USER_PASSWORD_CHANGED, Action.USER_DELETED,
        Action.GROUP_CREATED, Action.GROUP_CHANGED, Action.GROUP_DELETED, Action.DEVICE_CREATED,
        Action.DEVICE_CONFIRMED, Action.DEVICE_DELETED, Action.SIEM_CONSUMER_CREATED, Action.SIEM_CONSUMER_CHANGED}


@pytest.mark.django_db
def test_failure_summaries_record_the_window():
    event = _stored(events.login_failures_summarised(
        "203.0.113.9", actor=Actor(name="anonymous", ip_address="203.0.113.9"),
        window_start=datetime(2030, 1, 1, 12, 0, tzinfo=UTC), window_seconds=60, count=17))

    assert (event.action, event.outcome, event.target_type, event.target_id) == (
        "auth.login_failed", "failure", "address", "203.0.113.9")
    assert event.details == {"reason": "login_failed_summary", "window_start": "2030-01-01T12:00:00+00:00",
                             "window_seconds": 60, "count": 17, "recorded_individually": 1}
