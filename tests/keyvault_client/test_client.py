"""keyvault_client against a real Keyvault server: every method, batches, typed errors, retries, the DEK cache."""

from __future__ import annotations

import base64
import logging
import shutil
import subprocess
import sys
import time
import zipfile

import pytest

from keyvault_client import (
    DataKey,
    DataKeyCache,
    DecryptionFailed,
    Forbidden,
    KeyvaultClient,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    Unauthorized,
)
from tests.keyvault_client.conftest import BILLING, CountingTransport
from tests.scratch import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture
def client(live, token):
    with KeyvaultClient(live.url, token) as client:
        yield client


def test_generate_unwrap_and_describe_a_data_key_by_id(client):
    # given a data key generated under billing-kek
    key = client.generate_data_key("billing-kek", BILLING, purpose="invoices", owner_ref="inv-1")
    # then it is 32 bytes, unwraps by id to the same bytes, and its metadata holds no key material
    assert isinstance(key.plaintext, bytes) and len(key.plaintext) == 32
    assert (key.kek, key.kek_version) == ("billing-kek", 1)
    assert client.unwrap(key.id, BILLING) == key.plaintext
    meta = client.describe(key.id)
    assert (meta["id"], meta["kek"], meta["purpose"], meta["owner_ref"]) == (key.id, "billing-kek", "invoices", "inv-1")
    assert meta["context_keys"] == ["service"] and "plaintext" not in meta


def test_list_keks_names_only_the_clients_keks(client):
    assert [(k["name"], k["primary_version"]) for k in client.list_keks()] == [("billing-kek", 1)]


def test_encrypt_decrypt_and_rewrap_round_trip_bytes(client):
    blob = client.encrypt("billing-kek", b"\x00card 4111\xff", BILLING)
    assert isinstance(blob, bytes) and b"card 4111" not in blob
    assert client.decrypt(blob, BILLING) == b"\x00card 4111\xff"
    assert client.decrypt(client.rewrap(blob, BILLING), BILLING) == b"\x00card 4111\xff"


def test_batches_stay_aligned_and_a_bad_item_is_a_typed_error_in_its_slot(client):
    # given two good data keys and one id that is nobody's
    keys = client.generate_data_key_batch("billing-kek", [{"context": BILLING}, {"context": {"service": "hr"}},
                                                         {"context": BILLING, "purpose": "p"}])
    assert isinstance(keys[0], DataKey) and isinstance(keys[1], Forbidden) and isinstance(keys[2], DataKey)
    # when unwrapping them with a bad item in the middle
    unwrapped = client.unwrap_batch([(keys[0].id, BILLING), (2**40, BILLING), (keys[2].id, BILLING)])
    # then the good ones come back in place and the bad one is NotFound
    assert unwrapped[0] == keys[0].plaintext and unwrapped[2] == keys[2].plaintext
    assert isinstance(unwrapped[1], NotFound)
    blobs = client.encrypt_batch("billing-kek", [(b"one", BILLING), (b"two", BILLING)])
    opened = client.decrypt_batch([(blobs[0], BILLING), (b"not a blob", BILLING), (blobs[1], BILLING)])
    assert opened[0] == b"one" and isinstance(opened[1], DecryptionFailed) and opened[2] == b"two"
    moved = client.rewrap_batch([(blobs[1], BILLING), (blobs[0], {"service": "billing", "extra": "x"})])
    assert client.decrypt(moved[0], BILLING) == b"two" and isinstance(moved[1], DecryptionFailed)


def test_each_refusal_is_its_own_exception_class(live, token, client):
    with pytest.raises(Unauthorized) as unauthorized:
        KeyvaultClient(live.url, "kv_not-a-token").list_keks()
    assert unauthorized.value.status == 401 and unauthorized.value.code == "unauthorized"
    with pytest.raises(NotFound):
        client.generate_data_key("hr-kek", BILLING)  # exists, but is not this client's
    with pytest.raises(NotFound):
        client.unwrap(2**40, BILLING)
    with pytest.raises(Forbidden) as forbidden:
        client.generate_data_key("billing-kek", {"service": "hr"})
    assert forbidden.value.code == "forbidden-context"
    with pytest.raises(DecryptionFailed):
        client.decrypt(b"\x01" * 64, BILLING)
    with pytest.raises(PayloadTooLarge):
        client.encrypt("billing-kek", b"x" * 5000, BILLING)
    reader = live.create_client("reader", "billing-kek", ops="describe")
    with pytest.raises(Forbidden) as operation:
        KeyvaultClient(live.url, reader).generate_data_key("billing-kek", BILLING)
    assert operation.value.code == "forbidden-operation"


def test_a_rate_limited_client_succeeds_by_retrying(live):
    # given a client allowed one request per second
    token = live.create_client("slow", "billing-kek", rate_limit=1)
    client = KeyvaultClient(live.url, token, retries=10, deadline=20)
    # when it makes four calls back to back
    started = time.monotonic()
    names = [client.list_keks()[0]["name"] for _ in range(4)]
    # then every one succeeded, after waiting out 429s (about a second each)
    assert names == ["billing-kek"] * 4
    assert client.retried >= 2 and time.monotonic() - started >= 2


def test_a_rate_limited_client_gives_up_at_its_deadline(live):
    token = live.create_client("hasty", "billing-kek", rate_limit=1)
    client = KeyvaultClient(live.url, token, retries=10, deadline=0.5)
    started = time.monotonic()
    with pytest.raises(RateLimited) as limited:
        for _ in range(5):
            client.list_keks()
    # Retry-After says 1 s, which a 0.5 s deadline cannot wait for: no retry, a prompt RateLimited
    assert limited.value.retry_after == 1 and client.retried == 0
    assert time.monotonic() - started < 5


def test_other_client_errors_are_not_retried(live, token):
    transport = CountingTransport()
    client = KeyvaultClient(live.url, token, transport=transport)
    with pytest.raises(Forbidden):
        client.unwrap(1, {"service": "hr"})
    assert transport.requests == 1 and client.retried == 0


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_the_cache_serves_hits_locally_and_never_across_contexts(live, token):
    transport = CountingTransport()
    cache = DataKeyCache()
    client = KeyvaultClient(live.url, token, cache=cache, transport=transport)
    key = client.generate_data_key("billing-kek", BILLING)
    # a hit: the key generated is already cached under its context
    assert client.unwrap(key.id, {"service": "billing"}) == key.plaintext
    assert transport.requests == 1 and cache.hits == 1
    # another context is a miss, so the server judges it (and refuses it)
    with pytest.raises(Forbidden):
        client.unwrap(key.id, {"service": "hr"})
    assert transport.requests == 2
    # a batch sends only what the cache lacks
    other = KeyvaultClient(live.url, token).generate_data_key("billing-kek", BILLING)
    assert client.unwrap_batch([(key.id, BILLING), (other.id, BILLING)]) == [key.plaintext, other.plaintext]
    assert transport.requests == 3
    assert client.unwrap(other.id, BILLING) == other.plaintext and transport.requests == 3


def test_a_generated_batch_caches_each_key_under_its_own_items_context(live, token):
    # given a batch whose first item fails: the keys after it must not shift onto its context
    transport = CountingTransport()
    client = KeyvaultClient(live.url, token, cache=DataKeyCache(), transport=transport)
    refused, key = client.generate_data_key_batch("billing-kek", [{"context": {"service": "hr"}}, {"context": BILLING}])
    assert isinstance(refused, Forbidden) and isinstance(key, DataKey)
    # then the key is a hit under its own context, and not cached under the failed item's
    assert client.unwrap(key.id, BILLING) == key.plaintext and transport.requests == 1
    assert client.cache.get(key.id, {"service": "hr"}) is None


def test_cache_entries_expire_and_run_out_of_uses_and_are_wiped():
    clock = Clock()
    cache = DataKeyCache(max_age=10, max_uses=2, max_entries=2, clock=clock)
    cache.put(1, BILLING, b"k" * 32)
    entry = cache._entries[(1, '{"service":"billing"}')]
    assert cache.get(1, {"service": "billing"}) == b"k" * 32
    assert cache.get(1, BILLING) == b"k" * 32
    # the third use is past max_uses: a miss, and the bytes are zeroed
    assert cache.get(1, BILLING) is None and entry.key == bytearray(32)
    cache.put(1, BILLING, b"k" * 32)
    clock.now += 10
    assert cache.get(1, BILLING) is None and len(cache) == 0
    # the least recently used goes when a third entry arrives
    for key_id in (1, 2, 3):
        cache.put(key_id, BILLING, bytes([key_id]) * 32)
    assert cache.get(1, BILLING) is None and cache.get(3, BILLING) == b"\x03" * 32
    with pytest.raises(ValueError):
        DataKeyCache(max_uses=0)


def test_no_plaintext_in_reprs_errors_or_logs(live, token, caplog):
    caplog.set_level(logging.DEBUG)
    cache = DataKeyCache()
    client = KeyvaultClient(live.url, token, cache=cache)
    key = client.generate_data_key("billing-kek", BILLING)
    client.unwrap(key.id, BILLING)
    with pytest.raises(DecryptionFailed) as failed:
        client.decrypt(client.encrypt("billing-kek", b"secret-row", BILLING), {"service": "billing", "x": "y"})
    encoded = base64.b64encode(key.plaintext).decode()
    shown = " ".join([repr(key), str(key), repr(client), repr(cache), repr(failed.value), str(failed.value),
                      caplog.text])
    for secret in (encoded, repr(key.plaintext), key.plaintext.hex(), "secret-row", token):
        assert secret not in shown


def test_the_package_builds_as_a_wheel(tmp_path):
    # a copy, since setuptools leaves build/ and *.egg-info/ beside the sources it builds
    source = shutil.copytree(ROOT / "keyvault_client", tmp_path / "source", ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path / "dist"),
                            str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    [wheel] = (tmp_path / "dist").glob("keyvault_client-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"keyvault_client/client.py", "keyvault_client/errors.py", "keyvault_client/cache.py"} <= set(names)
    metadata = next(n for n in names if n.endswith("METADATA"))
    assert "Requires-Dist: httpx" in zipfile.ZipFile(wheel).read(metadata).decode()
