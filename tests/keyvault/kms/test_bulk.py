"""keyvault/kms/bulk.py: the bounded pool behind rewrap_many, and migration between real providers."""

import threading
import time

import pytest

from keyvault.kms import (
    ConfigurationError,
    EncryptResult,
    InvalidCiphertext,
    KeyNotFound,
    ProviderUnavailable,
    RewrapItem,
    Throttled,
)
from keyvault.kms.bulk import concurrency_option, map_bounded, migrate_many
from tests.keyvault.kms.backends.aws import moto_provider
from tests.servers.http_proxy import HTTPProxy

CONTEXT = {"tenant": "acme", "purpose": "bulk"}


class InFlight:
    """Counts calls running at once (the operation handed to map_bounded is plain code, not a provider)."""

    def __init__(self) -> None:
        self.now = self.peak = self.started = 0
        self.lock = threading.Lock()

    def __enter__(self) -> "InFlight":
        with self.lock:
            self.now += 1
            self.started += 1
            self.peak = max(self.peak, self.now)
        return self

    def __exit__(self, *exc_info: object) -> None:
        with self.lock:
            self.now -= 1


# -- map_bounded ----------------------------------------------------------------------------


def test_outcomes_are_aligned_and_at_most_concurrency_run_at_once():
    flight = InFlight()

    def square(number: int) -> int:
        with flight:
            time.sleep(0.01)
            if number % 7 == 3:
                raise InvalidCiphertext()
            return number * number

    outcomes = map_bounded(square, list(range(40)), concurrency=5)

    assert [type(outcome) for outcome in outcomes[3::7]] == [InvalidCiphertext] * 6
    assert [outcome for n, outcome in enumerate(outcomes) if n % 7 != 3] == [n * n for n in range(40) if n % 7 != 3]
    assert 1 < flight.peak <= 5


def test_an_outage_ends_the_call_and_nothing_new_is_started():
    flight = InFlight()

    def call(number: int) -> int:
        with flight:
            time.sleep(0.005)
            if number == 10:
                raise Throttled("slow down", retry_after=2)
            return number

    with pytest.raises(Throttled) as raised:
        map_bounded(call, list(range(200)), concurrency=4)

    assert raised.value.retry_after == 2
    assert flight.started <= 10 + 1 + 4, "workers stop taking items once one met the outage"


def test_a_bug_is_raised_not_returned_as_an_outcome():
    def broken(number: int) -> int:
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        map_bounded(broken, [1, 2, 3], concurrency=2)


def test_nothing_in_nothing_out():
    assert map_bounded(lambda item: item, [], concurrency=8) == []


@pytest.mark.parametrize("value", [0, -3, 257, 2.5, True, "many", None])
def test_concurrency_is_a_whole_number_from_1_to_256(value):
    with pytest.raises(ConfigurationError, match="HMD_X"):
        concurrency_option("HMD_X", value)


def test_concurrency_from_a_string_setting():
    assert concurrency_option("HMD_X", " 12 ") == 12


# -- migrate_many, between real providers --------------------------------------------------------


@pytest.fixture
def local(local_harness):
    """The local provider of the contract suite (a keyring in a temporary folder)."""
    return local_harness


@pytest.fixture
def vault(vault_harness):
    """The Vault provider of the contract suite (OpenBao, a token holding the documented policy)."""
    return vault_harness


def sealed(provider, key_id, count, context=CONTEXT) -> list[RewrapItem]:
    return [
        RewrapItem(provider.encrypt(key_id, b"dek %d" % n, encryption_context=context).ciphertext, context)
        for n in range(count)
    ]


def test_migrate_from_local_to_vault_keeps_each_context_and_reports_bad_items(local, vault):
    source_key, destination_key = local.new_key(), vault.new_key()
    items = sealed(local.provider, source_key, 5)
    items.insert(2, RewrapItem(items[0].ciphertext, {"tenant": "other"}))
    items.append(RewrapItem(b"junk", CONTEXT))

    results = migrate_many(local.provider, vault.provider, items, destination_key_id=destination_key, concurrency=3)

    assert [type(result) for result in results] == [EncryptResult] * 2 + [InvalidCiphertext] + [EncryptResult] * 3 + [
        InvalidCiphertext
    ]
    moved = [result for result in results if isinstance(result, EncryptResult)]
    assert {(result.key_id, result.key_version) for result in moved} == {(destination_key, 1)}
    assert [vault.provider.decrypt(result.ciphertext, encryption_context=CONTEXT).plaintext for result in moved] == [
        b"dek %d" % n for n in range(5)
    ]
    assert b"dek" not in repr(results).encode()


def test_migrate_to_a_key_the_destination_lacks_is_key_not_found_per_item(local, vault):
    items = sealed(local.provider, local.new_key(), 3)

    results = migrate_many(local.provider, vault.provider, items, destination_key_id=vault.new_key_id())

    assert [type(result) for result in results] == [KeyNotFound] * 3


def test_migrate_from_a_source_that_is_down_raises_for_the_whole_call(local, vault):
    items = sealed(vault.provider, vault.new_key(), 3)

    with pytest.raises(ProviderUnavailable):
        migrate_many(vault.broken_provider(), local.provider, items, destination_key_id=local.new_key())


def test_migrate_within_one_provider_is_its_own_rewrap_many(vault):
    source_key, destination_key = vault.new_key(), vault.new_key()
    items = sealed(vault.provider, source_key, 3)

    results = migrate_many(vault.provider, vault.provider, items, destination_key_id=destination_key)

    assert [result.key_id for result in results] == [destination_key] * 3
    assert vault.provider.decrypt(results[1].ciphertext, encryption_context=CONTEXT).plaintext == b"dek 1"


def test_migrate_keeps_concurrency_requests_in_flight_at_a_slow_destination(local, moto_server):
    source_key = local.new_key()
    items = sealed(local.provider, source_key, 24)
    with HTTPProxy(moto_server.endpoint_url, delay=0.04) as proxy:
        destination = moto_provider(moto_server, endpoint_url=proxy.url)
        destination_key = f"bulk-{source_key}"
        destination.create_key(destination_key)
        proxy.reset_counts()

        results = migrate_many(local.provider, destination, items, destination_key_id=destination_key, concurrency=4)

    assert all(isinstance(result, EncryptResult) for result in results)
    assert 1 < proxy.peak_in_flight <= 4
    assert destination.decrypt(results[23].ciphertext, encryption_context=CONTEXT).plaintext == b"dek 23"


def test_migrate_refuses_a_bad_concurrency(local, vault):
    with pytest.raises(ConfigurationError):
        migrate_many(local.provider, vault.provider, [], destination_key_id="k", concurrency=0)
