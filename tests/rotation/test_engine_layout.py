"""The engine's shape: drivers behind one interface, an injectable dispatcher, key state written by key services."""

import ast
import pathlib

import pytest
from django.db import transaction

from keyvault.audit import Actor
from keyvault.models import AuditEvent
from rotation import services
from rotation.engine.dispatch import Dispatcher
from rotation.engine.drivers import KekRotation, ManagedSecretRotation, ProviderMigration, driver_class
from rotation.engine.drivers.base import Driver
from rotation.models import RotationRun
from tests.rotation.conftest import seed_data_keys

ROTATION = pathlib.Path(__file__).resolve().parents[2] / "rotation"
S = RotationRun.State
ACTOR = Actor.system("tests")


def imported_modules(path: pathlib.Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize("path", sorted((ROTATION / "engine" / "drivers").glob("*.py")) + sorted(
    (ROTATION / "executors").glob("*.py")), ids=lambda p: p.name)
def test_drivers_and_executors_do_not_import_the_engine(path):
    engine = {name for name in imported_modules(path)
              if name.startswith(("rotation.engine", "rotation.services", "rotation.tasks"))
              and not name.startswith("rotation.engine.drivers")}
    assert engine == set(), f"{path.name} imports {sorted(engine)}; the engine lends drivers what they need (Hooks)"


def test_the_engine_does_not_import_the_tasks():
    for path in (ROTATION / "engine").rglob("*.py"):
        assert not {m for m in imported_modules(path) if m.startswith(("rotation.tasks", "rotation.services"))}, path


def test_no_module_in_rotation_is_over_500_lines():
    long = {str(p.relative_to(ROTATION)): n for p in ROTATION.rglob("*.py")
            if "migrations" not in p.parts and (n := len(p.read_text().splitlines())) > 500}
    assert long == {}


def test_each_kind_of_target_has_one_driver_behind_the_interface():
    assert driver_class(secret=False, kind=RotationRun.Kind.PLANNED) is KekRotation
    assert driver_class(secret=False, kind=RotationRun.Kind.MIGRATE) is ProviderMigration
    assert driver_class(secret=True, kind=RotationRun.Kind.EMERGENCY) is ManagedSecretRotation
    for driver in (KekRotation, ProviderMigration, ManagedSecretRotation):
        assert issubclass(driver, Driver) and not driver.__abstractmethods__


def test_a_redirected_dispatcher_runs_tasks_in_order_and_sends_nothing():
    # given a dispatcher whose Celery side records what it would send
    sent = []
    dispatcher = Dispatcher(send=lambda name, args, options: sent.append(name))
    ran = []

    # when a task sends two more while driven here
    def first():
        dispatcher("second", 2)
        dispatcher("third", 3)

    count = dispatcher.drive(("first", ()), {"first": first, "second": ran.append, "third": ran.append})
    with dispatcher.inline():
        dispatcher("dropped")

    # then they ran here, in order, and nothing reached Celery
    assert (count, ran, sent) == (3, [2, 3], [])


@pytest.mark.django_db(transaction=True)
def test_a_dispatched_task_leaves_only_after_commit():
    sent = []
    dispatcher = Dispatcher(send=lambda name, args, options: sent.append((name, args, options)))
    with transaction.atomic():
        dispatcher("execute_run", 7, priority=0)
        assert sent == []
    assert sent == [("execute_run", (7,), {"priority": 0})]


@pytest.mark.django_db
def test_rollback_restores_the_primary_through_the_key_services_audited_on_the_kek(kek):
    # given a rotation waiting out its grace period
    seed_data_keys(kek, 3)
    run = services.drive(services.start_run(kek=kek, actor=ACTOR).pk)
    assert run.state == S.RETIRING

    # when it is rolled back
    services.rollback(run, actor=ACTOR, reason="app errors")

    # then the KEK's own trail says its primary went back from v2 to v1, for this run
    event = AuditEvent.objects.filter(target_type="keyencryptionkey", target_id=kek.name,
                                      action=AuditEvent.Action.KEK_UPDATED).latest("sequence")
    assert event.details["primary_version"] == {"before": 2, "after": 1}
    assert event.details["run_id"] == run.pk
    assert kek.versions.get(is_primary=True).number == 1


@pytest.mark.django_db
def test_a_rotation_restarts_the_policys_schedule_and_rotates_through_the_key_services(kek):
    # given a 12-hour policy
    from datetime import timedelta

    policy = services.update_policy(kek, actor=ACTOR, period=timedelta(hours=12), grace_period=timedelta(0))
    before = AuditEvent.objects.latest("sequence").timestamp

    # when a rotation runs
    services.drive(services.start_run(kek=kek, actor=ACTOR).pk)

    # then the policy (the one schedule) is due 12 hours after the rotation the key services recorded
    kek.refresh_from_db()
    policy.refresh_from_db()
    rotated = AuditEvent.objects.filter(target_id=kek.name, action=AuditEvent.Action.KEK_ROTATED).latest("sequence")
    assert rotated.details["run_id"]
    assert before <= policy.next_due_at - timedelta(hours=12) <= kek.last_rotated_at <= rotated.timestamp
