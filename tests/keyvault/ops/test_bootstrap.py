"""First run: an administrator, the default KEK and demo data keys a first rotation really rewraps."""

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from keyvault.exceptions import KeyNotUsable
from keyvault.keys import services
from keyvault.models import AuditEvent, DataKey, KeyEncryptionKey
from keyvault.ops.bootstrap import DEFAULT_KEK, DEMO_DATA_KEYS, bootstrap, seed_demo_data_keys
from rotation import services as rotation
from rotation.models import RotationRun

pytestmark = pytest.mark.django_db


def test_a_fresh_installation_gets_demo_data_keys_under_its_default_kek():
    result = bootstrap(admin_password="correct horse battery staple")

    kek = KeyEncryptionKey.objects.get(name=DEFAULT_KEK)
    demo = DataKey.objects.filter(kek=kek, purpose="demo")
    assert result.kek_created and result.demo_data_keys == DEMO_DATA_KEYS == demo.count()
    assert set(demo.values_list("kek_version", flat=True)) == {1}
    assert AuditEvent.objects.filter(action=AuditEvent.Action.DATA_KEY_CREATED).count() == DEMO_DATA_KEYS


def test_bootstrap_seeds_nothing_when_asked_not_to_or_when_keys_exist(system_actor):
    assert bootstrap(admin_password="x" * 20, demo_data_keys=0).demo_data_keys == 0
    assert not DataKey.objects.exists()

    again = bootstrap(admin_password="x" * 20)

    assert (again.kek_created, again.demo_data_keys) == (False, 0) and not DataKey.objects.exists()


def test_a_rotation_of_the_seeded_key_rewraps_every_demo_data_key(system_actor):
    bootstrap(admin_password="correct horse battery staple")
    kek = KeyEncryptionKey.objects.get(name=DEFAULT_KEK)

    with rotation.inline_dispatch():
        run = rotation.start_run(kek=kek, actor=system_actor, user=None, kind="on_demand", reason="first session")
    run = rotation.drive(run.pk)

    assert (run.state, run.total_deks, run.rewrapped) == (RotationRun.State.RETIRING, DEMO_DATA_KEYS, DEMO_DATA_KEYS)
    assert set(DataKey.objects.filter(kek=kek).values_list("kek_version", flat=True)) == {2}


def test_seed_demo_command_registers_numbered_keys_and_refuses_bad_counts(system_actor, capsys):
    kek = services.create_kek(name="payments", actor=system_actor)

    call_command("kms", "seed-demo", "payments", "--data-keys", "3")
    call_command("kms", "seed-demo", "payments", "--data-keys", "2")

    assert "registered 2 demo data key(s) under payments (v1; 5 in all)" in capsys.readouterr().out
    assert sorted(DataKey.objects.filter(kek=kek).values_list("owner_ref", flat=True)) == [
        f"demo.payments.{n}" for n in range(5)]
    with pytest.raises(CommandError, match="give 1-10000, not 0"):
        call_command("kms", "seed-demo", "payments", "--data-keys", "0")
    services.disable_kek(kek, actor=system_actor)
    with pytest.raises(KeyNotUsable):
        seed_demo_data_keys(kek, count=1)
    assert DataKey.objects.filter(kek=kek).count() == 5
