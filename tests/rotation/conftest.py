import pytest
from django.contrib.auth.models import Group
from django.test import override_settings

from keyvault.access.roles import KEY_ADMINISTRATORS, KEY_OPERATORS
from keyvault.keys import services as key_services
from keyvault.kms import get_provider
from keyvault.models import DataKey, wrapped_key_fingerprint


@pytest.fixture
def kek(system_actor):
    return key_services.create_kek(name="payments", actor=system_actor)


def seed_data_keys(kek, n, *, context=None):
    """``n`` real data keys wrapped by the KEK's primary, inserted in bulk."""
    provider = get_provider(kek.provider)
    rows = []
    for i in range(n):
        ctx = context if context is not None else {"tenant": f"t{i % 7}"}
        data_key = provider.generate_data_key(kek.provider_key_id, encryption_context=ctx)
        rows.append(DataKey(kek=kek, kek_version=data_key.key_version, wrapped_key=data_key.ciphertext,
                            fingerprint=wrapped_key_fingerprint(data_key.ciphertext), encryption_context=ctx, owner_ref=f"seed.{i}"))
        data_key.wipe()
    DataKey.objects.bulk_create(rows, batch_size=2000)
    key_services.recount_data_keys()  # loaded around the services: their counters catch up
    return DataKey.objects.filter(kek=kek)


@pytest.fixture
def make_user(django_user_model):
    def make(username, *groups):
        user = django_user_model.objects.create_user(username, password="correct horse battery")
        for name in groups:
            user.groups.add(Group.objects.get_or_create(name=name)[0])
        return user

    return make


@pytest.fixture
def operator(make_user):
    return make_user("olivia", KEY_OPERATORS)


@pytest.fixture
def approvers(make_user):
    return make_user("adam", KEY_ADMINISTRATORS), make_user("bella", KEY_OPERATORS)


@pytest.fixture
def flaky_provider(settings, tmp_path):
    """A second provider named ``flaky``: the real local provider with an on/off switch."""
    flag = tmp_path / "outage"
    kms = {**settings.KMS, "providers": {**settings.KMS["providers"]}}
    kms["providers"]["flaky"] = {
        "class": "tests.rotation.flaky.FlakyLocalProvider",
        "keyring_path": str(tmp_path / "flaky.keyring"),
        "master_key": settings.LOCAL_KMS_MASTER_KEY,
        "outage_flag": str(flag),
        "throttle_flag": str(tmp_path / "throttle"),
    }
    with override_settings(KMS=kms):
        yield flag
