#!/usr/bin/env python
"""Envelope encryption on the path applications take, against Tink and the raw AES-GCM floor, in one run.

    .venv/bin/pip install -r bench/requirements.txt
    .venv/bin/python bench/envelope.py [--size 1024] [--seconds 0.01] [--rounds 61] [--strict]

The measured path is the public one: ``EnvelopeEncryptor(get_provider(), ...)``, i.e. the
registry's local provider inside its metrics proxy, with a two-pair encryption context.
Variants (one operation each, ``--size`` bytes of plaintext, 1 KiB by default):

* ``aes-gcm floor``       cryptography's ``AESGCM`` with one reused key object; encrypt draws a
                          fresh 12-byte nonce from ``os.urandom`` (as any correct use must),
                          decrypt opens a pre-split (nonce, ciphertext); no associated data.
* ``tink``                Tink's ``KmsEnvelopeAead`` (AES256_GCM DEKs; its "remote" KEK a local
                          Tink AES256_GCM AEAD), associated data = the context's canonical bytes.
* ``aws-sdk``             aws-encryption-sdk 4 with a raw AES keyring, the key-committing
                          non-signing suite, the same context as its encryption context.
* ``get_provider()``      the public path without a DEK cache: a fresh DEK per message, an unwrap
                          per decrypt; the context is a ``BoundContext`` (built once, as a field or
                          a tenant's context is).
* ``get_provider()+cache`` the same with a ``DataKeyCache`` (default limits).
* ``... dict context``    the public path with a plain dict instead (encoded on every call).
* ``bare provider``       ``EnvelopeEncryptor`` over a bare ``LocalKMSProvider`` (no metrics proxy),
                          for comparison only.

Rounds interleave every variant (the order rotates each round); a round times one batch of
about ``--seconds`` per variant and direction. The figure of record is the **median over
rounds of the wall-clock time per operation** (``time.perf_counter``); the best batch and
the median thread CPU time are printed beside it, labelled. Ratios divide medians from
this very run. Decrypt cycles through 64 distinct blobs per variant. Exits 0 unless
``--strict`` and a target is NOT MET. See bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402
from prometheus_client import REGISTRY  # noqa: E402

from keyvault.kms import get_provider, reset_providers, set_config_loader  # noqa: E402
from keyvault.kms.cache import DataKeyCache  # noqa: E402
from keyvault.kms.context import BoundContext, encode_context  # noqa: E402
from keyvault.kms.envelope import EnvelopeEncryptor  # noqa: E402
from keyvault.kms.local import LocalKMSProvider, generate_master_key  # noqa: E402
from keyvault.kms.metrics import InstrumentedProvider  # noqa: E402

BLOBS = 64
KEK = "bench-kek"
CONTEXT = {"tenant": "acme-corporation", "table": "invoices"}
PUBLIC = "get_provider()"
PUBLIC_CACHE = "get_provider()+cache"

Loop = Callable[[int], None]


# -- the variants --------------------------------------------------------------------


def floor_loops(data: bytes) -> dict[str, Loop]:
    cipher = AESGCM(AESGCM.generate_key(bit_length=256))
    pairs = []
    for _ in range(BLOBS):
        nonce = os.urandom(12)
        pairs.append((nonce, cipher.encrypt(nonce, data, None)))
    assert cipher.decrypt(*pairs[0], None) == data

    def encrypt(n: int) -> None:
        seal, urandom = cipher.encrypt, os.urandom
        for _ in range(n):
            seal(urandom(12), data, None)

    def decrypt(n: int) -> None:
        open_, count = cipher.decrypt, len(pairs)
        for i in range(n):
            nonce, sealed = pairs[i % count]
            open_(nonce, sealed, None)

    return {"encrypt": encrypt, "decrypt": decrypt}


def envelope_loops(provider, data: bytes, context, cache: DataKeyCache | None) -> dict[str, Loop]:
    encryptor = EnvelopeEncryptor(provider, KEK, cache=cache)

    seal, open_ = encryptor.encrypt, encryptor.decrypt
    blobs = [seal(data, encryption_context=context) for _ in range(BLOBS)]
    assert all(open_(blob, encryption_context=context) == data for blob in blobs)

    def encrypt_loop(n: int) -> None:
        for _ in range(n):
            seal(data, encryption_context=context)

    def decrypt_loop(n: int) -> None:
        count = len(blobs)
        for i in range(n):
            open_(blobs[i % count], encryption_context=context)

    return {"encrypt": encrypt_loop, "decrypt": decrypt_loop}


def tink_loops(data: bytes, associated_data: bytes) -> dict[str, Loop] | str:
    try:
        import tink
        from tink import aead
    except ImportError as exc:
        return f"not installed ({exc.name}); pip install -r bench/requirements.txt"
    aead.register()
    remote = tink.new_keyset_handle(aead.aead_key_templates.AES256_GCM).primitive(aead.Aead)
    envelope = aead.KmsEnvelopeAead(aead.aead_key_templates.AES256_GCM, remote)
    blobs = [envelope.encrypt(data, associated_data) for _ in range(BLOBS)]
    assert envelope.decrypt(blobs[0], associated_data) == data

    def encrypt(n: int) -> None:
        seal = envelope.encrypt
        for _ in range(n):
            seal(data, associated_data)

    def decrypt(n: int) -> None:
        open_, count = envelope.decrypt, len(blobs)
        for i in range(n):
            open_(blobs[i % count], associated_data)

    return {"encrypt": encrypt, "decrypt": decrypt}


def aws_loops(data: bytes, context: dict[str, str]) -> dict[str, Loop] | str:
    try:
        import aws_encryption_sdk
        from aws_cryptographic_material_providers.mpl import AwsCryptographicMaterialProviders
        from aws_cryptographic_material_providers.mpl.config import MaterialProvidersConfig
        from aws_cryptographic_material_providers.mpl.models import AesWrappingAlg, CreateRawAesKeyringInput
        from aws_encryption_sdk.identifiers import Algorithm, CommitmentPolicy
    except ImportError as exc:
        return f"not installed ({exc.name}); pip install -r bench/requirements.txt"
    providers = AwsCryptographicMaterialProviders(config=MaterialProvidersConfig())
    keyring = providers.create_raw_aes_keyring(
        input=CreateRawAesKeyringInput(
            key_namespace="bench",
            key_name=KEK,
            wrapping_key=os.urandom(32),
            wrapping_alg=AesWrappingAlg.ALG_AES256_GCM_IV12_TAG16,
        )
    )
    client = aws_encryption_sdk.EncryptionSDKClient(commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT)
    suite = Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY
    blobs = [
        client.encrypt(source=data, keyring=keyring, algorithm=suite, encryption_context=context)[0] for _ in range(8)
    ]
    assert client.decrypt(source=blobs[0], keyring=keyring, encryption_context=context)[0] == data

    def encrypt(n: int) -> None:
        for _ in range(n):
            client.encrypt(source=data, keyring=keyring, algorithm=suite, encryption_context=context)

    def decrypt(n: int) -> None:
        for i in range(n):
            client.decrypt(source=blobs[i % len(blobs)], keyring=keyring, encryption_context=context)

    return {"encrypt": encrypt, "decrypt": decrypt}


# -- timing --------------------------------------------------------------------------


@dataclass
class Samples:
    """Seconds per operation, one entry per round."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.wall)


def calibrate(loop: Loop, budget: float) -> int:
    """How many operations take about ``budget`` seconds of wall time."""
    n = 1
    while True:
        started = time.perf_counter()
        loop(n)
        elapsed = time.perf_counter() - started
        if elapsed >= budget / 4 or n >= 1 << 22:
            return max(1, int(n * budget / max(elapsed, 1e-9)))
        n *= 4


def measure(loops: dict[tuple[str, str], Loop], seconds: float, rounds: int) -> dict[tuple[str, str], Samples]:
    """Interleaved rounds: every loop runs one batch per round, in an order that rotates."""
    sizes = {key: calibrate(loop, seconds) for key, loop in loops.items()}
    samples = {key: Samples() for key in loops}
    keys = list(loops)
    for round_ in range(rounds):
        shift = round_ % len(keys)
        for key in keys[shift:] + keys[:shift]:
            n = sizes[key]
            cpu_started, started = time.thread_time(), time.perf_counter()
            loops[key](n)
            wall, cpu = time.perf_counter() - started, time.thread_time() - cpu_started
            samples[key].wall.append(wall / n)
            samples[key].cpu.append(cpu / n)
    return samples


def per_call(function: Callable[[], object], rounds: int = 21, n: int = 20000) -> float:
    """Median wall seconds of one call of ``function`` (for the context-encoding figures)."""
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(n):
            function()
        times.append((time.perf_counter() - started) / n)
    return statistics.median(times)


def operations_counted(operation: str) -> float:
    labels = {"provider": "local", "operation": operation}
    return REGISTRY.get_sample_value("keyvault_kms_operations_total", labels) or 0.0


# -- the run -------------------------------------------------------------------------


def build_loops(folder: Path, size: int) -> tuple[dict, dict, InstrumentedProvider]:
    keyring, master_key = folder / "keyring", generate_master_key()
    set_config_loader(
        lambda: {"default": "local", "providers": {"local": {"keyring_path": str(keyring), "master_key": master_key}}}
    )
    public = get_provider()
    assert isinstance(public, InstrumentedProvider), "get_provider() should hand out the metrics proxy"
    public.create_key(KEK)
    bare = LocalKMSProvider(keyring, master_key)

    data = os.urandom(size)
    bound = BoundContext(CONTEXT)
    variants: dict[str, dict[str, Loop] | str] = {
        "aes-gcm floor": floor_loops(data),
        "tink": tink_loops(data, bound.encoded),
        "aws-sdk": aws_loops(data, dict(CONTEXT)),
        PUBLIC: envelope_loops(public, data, bound, None),
        PUBLIC_CACHE: envelope_loops(public, data, bound, DataKeyCache()),
        f"{PUBLIC}, dict context": envelope_loops(public, data, dict(CONTEXT), None),
        f"{PUBLIC_CACHE}, dict context": envelope_loops(public, data, dict(CONTEXT), DataKeyCache()),
        "bare provider": envelope_loops(bare, data, bound, None),
        "bare provider+cache": envelope_loops(bare, data, bound, DataKeyCache()),
    }
    loops, missing = {}, {}
    for name, ops in variants.items():
        if isinstance(ops, str):
            missing[name] = ops
            continue
        for direction, loop in ops.items():
            loops[(name, direction)] = loop
    return loops, missing, public


def print_figures(samples: dict, missing: dict) -> None:
    names = list(dict.fromkeys(name for name, _ in samples))
    print(f"{'variant':<36}{'op':<9}{'median µs':>10}{'ops/s':>11}{'best µs':>9}{'cpu µs':>9}   (wall median is the figure)")
    for name in names:
        for direction in ("encrypt", "decrypt"):
            s = samples[(name, direction)]
            print(
                f"{name:<36}{direction:<9}{s.median * 1e6:>10.2f}{1 / s.median:>11,.0f}"
                f"{min(s.wall) * 1e6:>9.2f}{statistics.median(s.cpu) * 1e6:>9.2f}"
            )
    for name, why in missing.items():
        print(f"{name:<36}skipped: {why}")


def ratio(samples: dict, faster: str, slower: str, direction: str) -> float | None:
    """How many times as many operations per second ``faster`` makes as ``slower`` (wall medians)."""
    a, b = samples.get((faster, direction)), samples.get((slower, direction))
    return None if a is None or b is None else b.median / a.median


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", type=int, default=1024, help="plaintext bytes per message (default 1024)")
    parser.add_argument("--seconds", type=float, default=0.01, help="length of one timed batch (default 0.01)")
    parser.add_argument("--rounds", type=int, default=61, help="interleaved rounds (default 61)")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 if a target is NOT MET")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    started = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="keyvault-bench-") as folder:
        loops, missing, public = build_loops(Path(folder), args.size)
        counted_before = operations_counted("decrypt"), operations_counted("generate_data_key")
        samples = measure(loops, args.seconds, args.rounds)
        counted = operations_counted("decrypt") - counted_before[0], operations_counted("generate_data_key") - counted_before[1]
        bound, plain = BoundContext(CONTEXT), dict(CONTEXT)
        context_costs = {
            "encode_context(BoundContext)": per_call(lambda: encode_context(bound)),
            "encode_context(dict)": per_call(lambda: encode_context(plain)),
        }
        reset_providers()

    print(f"Envelope, {args.size} B, 2-pair encryption context, {args.rounds} interleaved rounds of ~{args.seconds * 1000:g} ms")
    print_figures(samples, missing)

    print("\nencryption context on the hot path (median wall time per call):")
    for label, seconds in context_costs.items():
        print(f"  {label:<30}{seconds * 1e6:>8.3f} µs")
    print(
        f"  metrics through the proxy's fast path: {counted[0]:,.0f} decrypt and {counted[1]:,.0f} "
        "generate_data_key calls counted during the run"
    )

    targets = [
        (f"{PUBLIC} / tink, encrypt", ratio(samples, PUBLIC, "tink", "encrypt"), 1.5),
        (f"{PUBLIC} / tink, decrypt", ratio(samples, PUBLIC, "tink", "decrypt"), 1.5),
        (f"{PUBLIC_CACHE} / aes-gcm floor, encrypt", ratio(samples, PUBLIC_CACHE, "aes-gcm floor", "encrypt"), 0.5),
        (f"{PUBLIC_CACHE} / aes-gcm floor, decrypt", ratio(samples, PUBLIC_CACHE, "aes-gcm floor", "decrypt"), 0.4),
    ]
    for cached in (PUBLIC, PUBLIC_CACHE):
        for direction in ("encrypt", "decrypt"):
            targets.append((f"{cached} / aws-sdk, {direction} (issue 2)", ratio(samples, cached, "aws-sdk", direction), 100))
    bound_cost = context_costs["encode_context(BoundContext)"]
    print(f"\n{'target (ops/s over ops/s, wall medians)':<52}{'measured':>9}{'target':>8}  result")
    met = 0
    for label, value, target in targets:
        if value is None:
            print(f"{label:<52}{'-':>9}{'≥' + format(target, 'g'):>8}  NOT MEASURED")
            continue
        ok = value >= target
        met += ok
        print(f"{label:<52}{value:>9.2f}{'≥' + format(target, 'g'):>8}  {'MET' if ok else 'NOT MET'}")
    context_ok = bound_cost < 1e-6
    met += context_ok
    print(f"{'2-pair BoundContext on the hot path, µs':<52}{bound_cost * 1e6:>9.3f}{'<1':>8}  {'MET' if context_ok else 'NOT MET'}")

    print("\nfor comparison (not targets):")
    for label, value in (
        ("bare provider / get_provider(), decrypt", ratio(samples, "bare provider", PUBLIC, "decrypt")),
        ("bare provider / get_provider(), encrypt", ratio(samples, "bare provider", PUBLIC, "encrypt")),
        (f"{PUBLIC}, dict context / tink, encrypt", ratio(samples, f"{PUBLIC}, dict context", "tink", "encrypt")),
        (f"{PUBLIC}, dict context / tink, decrypt", ratio(samples, f"{PUBLIC}, dict context", "tink", "decrypt")),
        (f"{PUBLIC_CACHE}, dict context / floor, encrypt",
         ratio(samples, f"{PUBLIC_CACHE}, dict context", "aes-gcm floor", "encrypt")),
        (f"{PUBLIC_CACHE}, dict context / floor, decrypt",
         ratio(samples, f"{PUBLIC_CACHE}, dict context", "aes-gcm floor", "decrypt")),
    ):
        print(f"  {label:<52}{'-' if value is None else format(value, '.2f'):>6}")

    total = len(targets) + 1
    print(
        f"\n{met}/{total} targets MET in {time.perf_counter() - started:.0f} s "
        f"(python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f} at the end)"
    )
    return 1 if args.strict and met < total else 0


if __name__ == "__main__":
    sys.exit(main())
