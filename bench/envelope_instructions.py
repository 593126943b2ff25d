#!/usr/bin/env python
"""Instructions per envelope operation, counted by valgrind's callgrind: immune to a busy machine.

    .venv/bin/pip install -r bench/requirements.txt      # tink
    .venv/bin/python bench/envelope_instructions.py [--ops 4000] [--size 1024] [--only public,tink]
    .venv/bin/python bench/envelope_instructions.py --annotate public   # where a variant's instructions go

Each variant runs in a child process under ``valgrind --tool=callgrind`` twice: once
with a warm-up only, once with the warm-up and ``--ops`` more operations. The
difference of the two totals, divided by ``--ops``, is what one operation costs:
interpreter start-up, imports, key creation and the warm-up cancel out.
``PYTHONHASHSEED=0`` keeps both runs' dictionaries alike. Wall-time figures stay
with ``bench/envelope.py``; this counts work, which a shared, noisy machine cannot
disturb (it says nothing of cache misses or of the clock).

Variants (decrypt, and encrypt where it exists; the loops are ``bench/envelope.py``'s):

* ``public``        ``EnvelopeEncryptor(get_provider(), ...)`` without a DEK cache, a 2-pair
                    ``BoundContext``: the path applications take (the registry's metrics proxy);
* ``bare``          the same over a bare ``LocalKMSProvider`` (no meter);
* ``tink``          Tink's ``KmsEnvelopeAead``, as ``bench/envelope.py`` measures it;
* ``crypto floor``  only the cryptography calls an uncached envelope decryption cannot do
                    without: the KEK's (kept) ``AESGCM.decrypt`` of the 60-byte wrapped DEK,
                    ``AESGCM(dek)``, its ``decrypt`` of the data; the loop around them;
* ``aes-gcm floor`` ``bench/envelope.py``'s floor: one reused ``AESGCM``, one ``decrypt`` / ``encrypt``.

``--annotate VARIANT`` keeps the callgrind file of the longer run and prints the functions
with the most instructions (``callgrind_annotate``), for finding where they go.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

VARIANTS = ("public", "bare", "tink", "crypto floor", "aes-gcm floor")
WARM_UP = 300
_TOTALS = re.compile(rb"^(?:summary|totals):\s*(\d+)", re.MULTILINE)


# -- the child: build one variant, run it n times --------------------------------------


def crypto_floor_loops(data: bytes, aad: bytes) -> dict:
    """The AES-GCM calls of one uncached envelope decryption, and nothing else."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    kek = AESGCM(AESGCM.generate_key(bit_length=256))
    blobs = []
    for _ in range(64):
        dek, kek_nonce, nonce = os.urandom(32), os.urandom(12), os.urandom(12)
        blobs.append((kek_nonce, kek.encrypt(kek_nonce, dek, aad), nonce, AESGCM(dek).encrypt(nonce, data, aad)))

    def decrypt(n: int) -> None:
        open_kek, count = kek.decrypt, len(blobs)
        for i in range(n):
            kek_nonce, wrapped, nonce, sealed = blobs[i % count]
            AESGCM(open_kek(kek_nonce, wrapped, aad)).decrypt(nonce, sealed, aad)

    return {"decrypt": decrypt}


def build(variant: str, folder: Path, size: int) -> dict:
    import envelope as bench

    from keyvault.kms import get_provider, set_config_loader
    from keyvault.kms.context import BoundContext
    from keyvault.kms.local import LocalKMSProvider, generate_master_key

    data, bound = os.urandom(size), BoundContext(bench.CONTEXT)
    if variant == "tink":
        loops = bench.tink_loops(data, bound.encoded)
        if isinstance(loops, str):
            raise SystemExit(f"tink {loops}")
        return loops
    if variant == "aes-gcm floor":
        return bench.floor_loops(data)
    if variant == "crypto floor":
        return crypto_floor_loops(data, bound.encoded)
    keyring, master_key = folder / "keyring", generate_master_key()
    set_config_loader(
        lambda: {"default": "local", "providers": {"local": {"keyring_path": str(keyring), "master_key": master_key}}}
    )
    provider = get_provider()
    provider.create_key(bench.KEK)
    if variant == "bare":
        provider = LocalKMSProvider(keyring, master_key)
    return bench.envelope_loops(provider, data, bound, None)


def child(variant: str, direction: str, ops: int, size: int) -> None:
    with tempfile.TemporaryDirectory(prefix="keyvault-instructions-") as folder:
        loop = build(variant, Path(folder), size)[direction]
        loop(WARM_UP)
        loop(ops)


# -- the parent: run children under callgrind ------------------------------------------


def callgrind(variant: str, direction: str, ops: int, size: int, out: Path) -> int:
    """Total instructions of a child doing the warm-up and ``ops`` operations."""
    command = [
        "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
        sys.executable, __file__, "--child", variant, direction, str(ops), "--size", str(size),
    ]
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
    finished = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if finished.returncode != 0:
        sys.stderr.write(finished.stderr.decode(errors="replace")[-3000:])
        raise SystemExit(f"{variant} {direction}: the child failed")
    return int(_TOTALS.search(out.read_bytes()).group(1))


def per_operation(variant: str, direction: str, ops: int, size: int, folder: Path) -> tuple[float, Path, Path]:
    """(instructions per operation, callgrind file of the short run, of the long run)."""
    stem = folder / f"{variant.replace(' ', '-')}-{direction}"
    short_run, long_run = stem.with_suffix(".base.out"), stem.with_suffix(".out")
    base = callgrind(variant, direction, 0, size, short_run)
    return (callgrind(variant, direction, ops, size, long_run) - base) / ops, short_run, long_run


def function_costs(run: Path) -> dict[str, int]:
    """Self instructions of every function in a callgrind file (``callgrind_annotate``)."""
    listing = subprocess.run(
        ["callgrind_annotate", "--threshold=100", str(run)], capture_output=True, text=True, check=True
    ).stdout
    costs: dict[str, int] = {}
    for match in re.finditer(r"^\s*([\d,]+) \([^)]*\)\s+(\S.*?)(?: \[.*\])?$", listing, re.MULTILINE):
        name = match.group(2).split("/")[-1]
        if name != "PROGRAM TOTALS":
            costs[name] = costs.get(name, 0) + int(match.group(1).replace(",", ""))
    return costs


def annotate(variant: str, direction: str, ops: int, size: int, top: int) -> None:
    """Per operation, the functions whose self instructions grew most between the short and the long run."""
    with tempfile.TemporaryDirectory(prefix="keyvault-callgrind-") as folder:
        cost, short_run, long_run = per_operation(variant, direction, ops, size, Path(folder))
        before, after = function_costs(short_run), function_costs(long_run)
    print(f"{variant} {direction}: {cost:,.0f} instructions per operation; self instructions per operation:")
    grown = sorted(((after[name] - before.get(name, 0)) / ops, name) for name in after)
    for each, name in reversed(grown[-top:]):
        print(f"{each:>9,.0f}  {name}")
    print(f"{sum(each for each, _ in grown):>9,.0f}  (all functions)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--ops", type=int, default=4000, help="operations counted per variant (default 4000)")
    parser.add_argument("--size", type=int, default=1024, help="plaintext bytes per message (default 1024)")
    parser.add_argument("--only", default=",".join(VARIANTS), help="comma-separated variants")
    parser.add_argument("--direction", default="decrypt,encrypt", help="decrypt, encrypt or both")
    parser.add_argument("--annotate", metavar="VARIANT", help="print where one variant's decrypt instructions go")
    parser.add_argument("--top", type=int, default=40, help="functions listed by --annotate")
    parser.add_argument("--child", nargs=3, metavar=("VARIANT", "DIRECTION", "OPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        variant, direction, ops = args.child
        child(variant, direction, int(ops), args.size)
        return 0
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    if args.annotate:
        annotate(args.annotate, args.direction.split(",")[0], args.ops, args.size, args.top)
        return 0

    figures: dict[tuple[str, str], float] = {}
    print(f"Instructions per operation (callgrind, {args.ops} operations after a {WARM_UP}-operation warm-up, "
          f"{args.size} B, 2-pair context)")
    print(f"{'variant':<16}{'op':<9}{'instructions':>13}")
    with tempfile.TemporaryDirectory(prefix="keyvault-callgrind-") as folder:
        for direction in args.direction.split(","):
            for variant in args.only.split(","):
                if variant == "crypto floor" and direction == "encrypt":
                    continue
                cost, _, _ = per_operation(variant, direction, args.ops, args.size, Path(folder))
                figures[(variant, direction)] = cost
                print(f"{variant:<16}{direction:<9}{cost:>13,.0f}", flush=True)

    print("\nratios of instructions (a proxy for the wall-time ratios of bench/envelope.py):")
    for direction in args.direction.split(","):
        tink, public = figures.get(("tink", direction)), figures.get(("public", direction))
        if tink and public:
            print(f"  tink / public, {direction:<8}{tink / public:>6.2f}   (target ≥ 1.5 in wall time)")
            print(f"  public instructions allowed for 1.5x, {direction}: {tink / 1.5:,.0f}")
        floor = figures.get(("crypto floor", direction))
        if floor and public:
            print(f"  public - crypto floor, {direction}: {public - floor:,.0f} instructions of Python around the crypto")
    return 0


if __name__ == "__main__":
    sys.exit(main())
