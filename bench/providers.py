#!/usr/bin/env python
"""Per-provider envelope figures: DEK unwrap latency with and without the DEK cache, KMS calls per 10 000 encryptions.

    .venv/bin/python bench/providers.py [--unwraps 300] [--cached-decrypts 3000] [--only local,aws]

Every backend is real and local, started the way the test fixtures start them
(helpers imported from ``tests/servers/``): ``local`` on a temporary keyring;
``aws`` through boto3 on moto's HTTP server; ``gcp`` through google-cloud-kms on
the Cloud KMS REST emulator; ``vault`` through hvac on an OpenBao dev server;
``pkcs11`` through python-pkcs11 on a SoftHSM2 token. Everything listens on
127.0.0.1, so the figures are client + emulator cost, not a cloud round trip.

Each provider is used the way the registry hands it out: wrapped in
:class:`keyvault.kms.metrics.InstrumentedProvider`, whose call counters are the
"counting wrapper" for the call counts below. Per provider:

* **unwrap, no cache**: ``EnvelopeEncryptor`` without a cache; ``--unwraps`` blobs
  each with its own DEK, every decrypt timed (one provider ``decrypt`` each).
* **unwrap, cache**: ``EnvelopeEncryptor`` with a ``DataKeyCache`` (default limits),
  starting cold; blobs written through the cache (so they share DEKs) are
  decrypted ``--cached-decrypts`` times, every decrypt timed.
* **KMS calls / 10k enc**: 10 000 envelope encryptions of 64 bytes with a fresh
  ``DataKeyCache`` (default limits); every provider call counted. Target: ≤ 10.

Bounded: about a minute for all five (server start-up included).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import REGISTRY  # noqa: E402

from keyvault.kms.cache import DataKeyCache  # noqa: E402
from keyvault.kms.envelope import EnvelopeEncryptor  # noqa: E402
from keyvault.kms.metrics import INSTRUMENTED_OPERATIONS, InstrumentedProvider  # noqa: E402

ENCRYPTIONS = 10_000
CALL_TARGET = 10
MESSAGE = os.urandom(64)
CONTEXT = {"table": "bench"}


# -- backends: each a context manager yielding a real provider ------------------------


@contextmanager
def local_backend() -> Iterator:
    from keyvault.kms.local import LocalKMSProvider, generate_master_key

    with tempfile.TemporaryDirectory(prefix="bench-local-") as folder:
        yield LocalKMSProvider.from_config(
            {"keyring_path": str(Path(folder) / "local.keyring"), "master_key": generate_master_key()}
        )


@contextmanager
def aws_backend() -> Iterator:
    from keyvault.kms.aws import AWSKMSProvider
    from tests.servers.moto import fake_aws_credentials, running_moto_server

    with fake_aws_credentials(), running_moto_server() as server:
        yield AWSKMSProvider(region=server.region, endpoint_url=server.endpoint_url, connect_timeout=2.0,
                             read_timeout=5.0, max_attempts=2)


@contextmanager
def gcp_backend() -> Iterator:
    from keyvault.kms.gcp import GCPKMSProvider
    from tests.servers.gcp_kms import CloudKMSEmulator

    with CloudKMSEmulator() as emulator:
        yield GCPKMSProvider(project="keyvault-bench", location="global", key_ring="bench",
                             endpoint=emulator.url, anonymous_credentials=True, timeout=5.0)


@contextmanager
def vault_backend() -> Iterator:
    from keyvault.kms.vault import TokenAuth, VaultTransitProvider
    from tests.servers.openbao import running_openbao

    with running_openbao() as server:
        server.enable_secrets_engine("transit", "transit")
        yield VaultTransitProvider(server.addr, TokenAuth(server.root_token), timeout=5)


@contextmanager
def pkcs11_backend() -> Iterator:
    from keyvault.kms.pkcs11 import PKCS11Provider
    from tests.servers.softhsm import SoftHSM

    with tempfile.TemporaryDirectory(prefix="bench-softhsm-") as folder, SoftHSM(Path(folder)) as hsm:
        token = hsm.token()
        yield PKCS11Provider(hsm.library, token.label, token.pin)


BACKENDS: dict[str, Callable] = {
    "local": local_backend,
    "aws": aws_backend,
    "gcp": gcp_backend,
    "vault": vault_backend,
    "pkcs11": pkcs11_backend,
}


# -- measurements -------------------------------------------------------------------


def provider_calls(label: str) -> int:
    """Every call the counting wrapper saw for ``label``, all operations together."""
    total = 0.0
    for operation in INSTRUMENTED_OPERATIONS:
        value = REGISTRY.get_sample_value("keyvault_kms_operations_total", {"provider": label, "operation": operation})
        total += value or 0.0
    return int(total)


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def timed_decrypts(encryptor: EnvelopeEncryptor, blobs: list[bytes], count: int) -> list[float]:
    """Decrypt ``count`` times cycling through ``blobs``; latency of each in milliseconds."""
    samples = []
    clock = time.perf_counter
    for index in range(count):
        blob = blobs[index % len(blobs)]
        started = clock()
        plaintext = encryptor.decrypt(blob, encryption_context=CONTEXT)
        samples.append((clock() - started) * 1000)
        if plaintext != MESSAGE:
            raise AssertionError("a blob did not decrypt to its message")
    return samples


def measure(name: str, raw_provider, *, unwraps: int, cached_decrypts: int) -> dict:
    label = f"bench-{name}"
    provider = InstrumentedProvider(raw_provider, label=label)
    key_id = provider.create_key(f"bench-{uuid.uuid4().hex[:8]}").key_id

    # Without a cache: every blob has its own DEK and every decrypt unwraps it at the provider.
    plain = EnvelopeEncryptor(provider, key_id)
    blobs = [plain.encrypt(MESSAGE, encryption_context=CONTEXT) for _ in range(unwraps)]
    before = provider_calls(label)
    uncached = timed_decrypts(plain, blobs, unwraps)
    uncached_calls = provider_calls(label) - before

    # With the cache: blobs written through it share DEKs; decryption starts cold.
    writer = EnvelopeEncryptor(provider, key_id, cache=DataKeyCache())
    shared = [writer.encrypt(MESSAGE, encryption_context=CONTEXT) for _ in range(64)]
    reader = EnvelopeEncryptor(provider, key_id, cache=DataKeyCache())
    before = provider_calls(label)
    cached = timed_decrypts(reader, shared, cached_decrypts)
    cached_calls = provider_calls(label) - before

    # KMS calls per 10 000 encryptions, cache on with its default limits.
    counting = EnvelopeEncryptor(provider, key_id, cache=DataKeyCache())
    before = provider_calls(label)
    started = time.perf_counter()
    for _ in range(ENCRYPTIONS):
        counting.encrypt(MESSAGE, encryption_context=CONTEXT)
    encrypt_seconds = time.perf_counter() - started
    calls = provider_calls(label) - before

    return {
        "provider": name,
        "uncached_p50": statistics.median(uncached),
        "uncached_p99": percentile(uncached, 0.99),
        "uncached_calls": uncached_calls,
        "cached_p50": statistics.median(cached),
        "cached_p99": percentile(cached, 0.99),
        "cached_calls": cached_calls,
        "calls_per_10k": calls,
        "encrypt_rate": ENCRYPTIONS / encrypt_seconds,
    }


def print_table(rows: list[dict], failures: dict[str, str], *, unwraps: int, cached_decrypts: int) -> bool:
    header = (
        f"{'provider':<8} | {'unwrap p50':>10} {'p99':>8} (no cache, {unwraps} blobs) | "
        f"{'unwrap p50':>10} {'p99':>8} (cache, {cached_decrypts} decrypts) | "
        f"{'KMS calls/10k enc':>17} | {'target ≤10':>10}"
    )
    print(header)
    print("-" * len(header))
    met_everywhere = True
    for row in rows:
        met = row["calls_per_10k"] <= CALL_TARGET
        met_everywhere &= met
        print(
            f"{row['provider']:<8} | {row['uncached_p50']:>8.3f}ms {row['uncached_p99']:>6.3f}ms "
            f"({row['uncached_calls']} KMS calls){'':>8} | "
            f"{row['cached_p50']:>8.4f}ms {row['cached_p99']:>6.3f}ms "
            f"({row['cached_calls']} KMS calls){'':>10} | "
            f"{row['calls_per_10k']:>17} | {'met' if met else 'MISSED':>10}"
        )
    for name, reason in failures.items():
        met_everywhere = False
        print(f"{name:<8} | not measured: {reason}")
    print()
    for row in rows:
        print(f"{row['provider']}: {row['encrypt_rate']:,.0f} envelope encryptions/s with the cache")
    print()
    verdict = "met" if met_everywhere else "NOT met"
    print(f"Target (≤ {CALL_TARGET} KMS calls per {ENCRYPTIONS:,} envelope encryptions, cache on, default limits): {verdict}")
    return met_everywhere


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--unwraps", type=int, default=300, help="uncached decrypts per provider (default 300)")
    parser.add_argument("--cached-decrypts", type=int, default=3000, help="cached decrypts per provider (default 3000)")
    parser.add_argument("--only", default=",".join(BACKENDS), help="comma-separated providers (default: all five)")
    options = parser.parse_args(argv)
    names = [name.strip() for name in options.only.split(",") if name.strip()]
    unknown = sorted(set(names) - set(BACKENDS))
    if unknown:
        parser.error(f"unknown providers {unknown}; choose from {sorted(BACKENDS)}")

    rows, failures = [], {}
    started = time.perf_counter()
    for name in names:
        phase = time.perf_counter()
        try:
            with ExitStack() as stack:
                provider = stack.enter_context(BACKENDS[name]())
                rows.append(measure(name, provider, unwraps=options.unwraps, cached_decrypts=options.cached_decrypts))
        except Exception as exc:  # a backend that cannot start is reported, the others still run
            failures[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        print(f"[{name}: {time.perf_counter() - phase:.1f}s]", file=sys.stderr)
    print(f"[total {time.perf_counter() - started:.1f}s]\n", file=sys.stderr)
    met = print_table(rows, failures, unwraps=options.unwraps, cached_decrypts=options.cached_decrypts)
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
