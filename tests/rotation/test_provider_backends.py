"""Rotation runs against real KMS servers: an outage mid-rewrap, and a local → AWS migration.

The outage is real: the Cloud KMS emulator stops listening on its port (and
later listens again on the same port, its keys intact), and a private OpenBao
server is frozen with SIGSTOP (every request times out) and thawed with
SIGCONT. The migration goes from the local provider to AWS KMS on moto's HTTP
server, through boto3. Each provider is installed with ``override_settings(KMS=...)``
the way ``tests/rotation/conftest.py::flaky_provider`` adds one.
"""

from __future__ import annotations

import copy
import os
import signal
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import pytest
from django.test import override_settings
from django.utils import timezone

from keyvault import audit
from keyvault.audit import Actor
from keyvault.keys import services as key_services
from keyvault.kms import ProviderUnavailable, get_provider
from keyvault.models import AuditEvent, DataKey
from rotation import services
from rotation.models import RotationRun
from tests.rotation.conftest import seed_data_keys
from tests.servers.gcp_kms import CloudKMSEmulator
from tests.servers.openbao import running_openbao

pytestmark = pytest.mark.django_db
S = RotationRun.State
ACTOR = Actor.system("tests")
SEEDED = 30
BATCH = 10


@dataclass
class Backend:
    """A provider entry for ``settings.KMS`` and a switch that takes its server down and up."""

    name: str
    options: dict
    down: callable
    up: callable


@contextmanager
def gcp_backend() -> Iterator[Backend]:
    emulator = CloudKMSEmulator().start()
    options = {
        "project": "keyvault-test",
        "location": "global",
        "key_ring": f"outage-{uuid.uuid4().hex[:8]}",
        "endpoint": emulator.url,
        "anonymous_credentials": True,
        "timeout": 1.0,
    }
    try:
        yield Backend("gcp", options, down=emulator.stop, up=emulator.start)
    finally:
        emulator.stop()


@contextmanager
def vault_backend() -> Iterator[Backend]:
    with running_openbao() as server:
        server.enable_secrets_engine("transit", "transit")
        options = {"addr": server.addr, "token": server.root_token, "mount": "transit", "timeout": 1.0}
        # A frozen server accepts connections and never answers: requests time out.
        freeze = lambda: os.kill(server.process.pid, signal.SIGSTOP)  # noqa: E731
        thaw = lambda: os.kill(server.process.pid, signal.SIGCONT)  # noqa: E731
        try:
            yield Backend("vault", options, down=freeze, up=thaw)
        finally:
            thaw()


BACKENDS = {"gcp": gcp_backend, "vault": vault_backend}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request, settings) -> Iterator[Backend]:
    with BACKENDS[request.param]() as backend:
        kms = copy.deepcopy(settings.KMS)
        kms["providers"][backend.name] = backend.options
        with override_settings(KMS=kms):
            yield backend


def openings(kek) -> dict[int, tuple[int, bytes]]:
    """Every data key of ``kek`` opened through its provider: id -> (version it opened under, plaintext)."""
    provider = get_provider(kek.provider)
    opened = {}
    for pk, wrapped, context, version in DataKey.objects.filter(kek=kek).values_list(
        "pk", "wrapped_key", "encryption_context", "kek_version"
    ):
        result = provider.decrypt(bytes(wrapped), encryption_context=context)
        assert result.key_version == version, f"data key #{pk} says v{version}, opens under v{result.key_version}"
        opened[pk] = (result.key_version, bytes(result.plaintext))
    return opened


def test_an_outage_mid_rewrap_pauses_the_run_and_it_completes_after_recovery(backend, settings):
    # given a KEK at a real server with data keys wrapped by its first version
    settings.ROTATION_BATCH_SIZE = BATCH
    kek = key_services.create_kek(name=f"ledger-{uuid.uuid4().hex[:6]}", actor=ACTOR, provider_name=backend.name)
    assert kek.provider == backend.name
    seed_data_keys(kek, SEEDED)
    before = {pk: plaintext for pk, (_, plaintext) in openings(kek).items()}

    # and a rotation that rotated the key and rewrapped its first batch
    with services.inline_dispatch():
        run = services.start_run(kek=kek, actor=ACTOR, reason="outage drill")
        assert services.execute_run(run.pk) == S.REWRAPPING
        run.refresh_from_db()
        count, last_id = services.rewrap_batch(run, after=0, hi=10**12, batch_size=BATCH)
    assert count == BATCH
    assert key_services.version_coverage(kek) == {1: SEEDED - BATCH, 2: BATCH}

    # when the server goes down in the middle of the rewrap
    backend.down()
    try:
        run.refresh_from_db()
        with pytest.raises(ProviderUnavailable):
            services.rewrap_batch(run, after=last_id, hi=10**12, batch_size=BATCH)
        with pytest.raises(ProviderUnavailable):
            services.drive(run.pk)  # a worker retrying meets the same outage
    finally:
        backend.up()

    # then the run is still rewrapping, and the failed batches wrote nothing
    run.refresh_from_db()
    assert run.state == S.REWRAPPING
    assert run.rewrapped == BATCH and run.failed_deks == 0
    assert key_services.version_coverage(kek) == {1: SEEDED - BATCH, 2: BATCH}
    assert AuditEvent.objects.filter(action="rotation.batch", details__run_id=run.pk).count() == 1

    # when the server is back and the run is driven on
    run = services.drive(run.pk)
    assert run.state == S.RETIRING
    run = services.drive(run.pk, now=timezone.now() + timedelta(days=8))

    # then it completed, every data key opens under the new version with its original plaintext
    assert run.state == S.COMPLETED
    assert (run.total_deks, run.rewrapped, run.failed_deks) == (SEEDED, SEEDED, 0)
    after = openings(kek)
    assert {version for version, _ in after.values()} == {2}
    assert {pk: plaintext for pk, (_, plaintext) in after.items()} == before
    assert audit.verify_chain().ok


@pytest.fixture
def aws_provider(settings, moto_server):
    """The ``aws`` provider entry pointed at the session's moto server."""
    kms = copy.deepcopy(settings.KMS)
    kms["providers"]["aws"] = {
        "region": moto_server.region,
        "endpoint_url": moto_server.endpoint_url,
        "connect_timeout": 2.0,
        "read_timeout": 5.0,
        "max_attempts": 2,
    }
    with override_settings(KMS=kms):
        yield get_provider("aws")


def test_migration_from_the_local_provider_to_aws(kek, aws_provider, system_actor):
    # given a local KEK with data keys, and a KEK at AWS KMS (moto)
    assert kek.provider == "local"
    seed_data_keys(kek, 25)
    plaintexts = {pk: plaintext for pk, (_, plaintext) in openings(kek).items()}
    destination = key_services.create_kek(name=f"payments-aws-{uuid.uuid4().hex[:6]}", actor=system_actor,
                                          provider_name="aws")
    assert destination.provider == "aws"

    # when a migration run is started and driven
    run = services.start_run(kek=kek, actor=ACTOR, kind="migrate", destination=destination, reason="to AWS")
    run = services.drive(run.pk)

    # then it completed and every data key now belongs to the AWS KEK
    assert run.state == S.COMPLETED
    assert (run.total_deks, run.rewrapped, run.failed_deks) == (25, 25, 0)
    assert not DataKey.objects.filter(kek=kek).exists()
    assert set(plaintexts) == set(DataKey.objects.filter(kek=destination).values_list("pk", flat=True))

    # and each one decrypts through the AWS provider to the same data key as before
    for pk, wrapped, context, version in DataKey.objects.filter(kek=destination).values_list(
        "pk", "wrapped_key", "encryption_context", "kek_version"
    ):
        opened = aws_provider.decrypt(bytes(wrapped), encryption_context=context)
        assert opened.key_id == destination.provider_key_id and opened.key_version == version
        assert bytes(opened.plaintext) == plaintexts[pk]
    assert audit.verify_chain().ok
