#!/usr/bin/env python
"""Bulk rewrap throughput of the rotation engine against a hand-written floor (Keyvault issues 4 and 14).

    .venv/bin/python bench/rewrap.py [--provider local|vault|aws|gcp] [--n N] [--rounds R] [--keep]
    .venv/bin/python bench/rewrap.py --kill N [--n 30000]     # worker-kill mode, see bench/_workerkill.py

Every mode: a fresh PostgreSQL database (default ``kv_bench_rewrap``), ``manage.py migrate``,
one KEK made through ``keyvault.keys.services.create_kek`` at the provider, its rotation
policy set to no approvals and no grace period (so each run completes), ``--n`` real data
keys wrapped by the provider and COPYed in. Then, in one run and interleaved ``--rounds``
times (figures are the medians), each variant rewraps every data key to a newer version:

* ``floor``      hand-written, one process. ``local``: keyset-paged ``SELECT``, the local
                 provider's ``rewrap`` per row, binary ``COPY`` into a temporary table and one
                 ``UPDATE … FROM`` per batch. ``vault``: ``transit/rewrap`` with ``batch_input``
                 of 200. ``aws``: boto3 ``ReEncrypt`` from 16 threads. ``gcp``: Cloud KMS decrypt
                 + encrypt from 16 threads. The remote floors write nothing to the database.
* ``engine x1``  ``rotation.services.start_run`` with one real Celery worker process
                 (``--concurrency 1``), Redis broker (``--redis-url``).
* ``engine x2``  the same with two worker processes.
* ``naive``      (local only) a per-row ORM ``save()`` loop over ``--naive-sample`` rows.

The engine's figure is its rewrap phase (from the run leaving *rotating* to it leaving
*rewrapping*, polled every 20 ms). Remote servers are the test suite's real ones (OpenBao,
moto's server, the Cloud KMS emulator); moto and the emulator sit behind a proxy adding
``--delay-ms`` (20) per request, as a real region is that far. Rate limits are off
(``HMD_ROTATION_RATE_LIMITS``), since the floor has none.

Targets: ``local`` engine >= 50% of the floor, and two workers at >= 50 000 DEKs/s
(1M in <= 20 s); ``vault`` engine >= 25% of the floor; ``aws`` >= 50%; ``gcp`` >= 50%
(as AWS: the issue sets none). Exit status 1 if a target is missed. Workers, servers,
PostgreSQL and this process share the machine's CPUs; the CPU count and load are printed.
Database, Redis DB, data folder, servers and workers are cleaned up unless ``--keep``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _common as c  # noqa: E402

REDIS_URL = "redis://127.0.0.1:6379/9"
KEK_NAME = "bench-rewrap"
COPY_CHUNK = 20_000
#: Engine / floor, per provider (issue 14).
ENGINE_VS_FLOOR_TARGET = {"local": 0.5, "vault": 0.25, "aws": 0.5, "gcp": 0.5}
#: Two workers on the local provider: 1M data keys in 20 s.
LOCAL_X2_TARGET = 1_000_000 / 20
#: Informational since issue 14: on a quiet disk the naive loop commits fast enough that no rewrap reaches it.
ENGINE_VS_NAIVE_INFO = 30.0
DEFAULT_N = {"local": 1_000_000, "vault": 20_000, "aws": 1_000, "gcp": 1_000}
#: Worker-kill mode (issue 14): a 30k-DEK rotation on two workers.
KILL_N = 30_000
DEFAULT_ROUNDS = {"local": 1, "vault": 3, "aws": 3, "gcp": 3}


# -- loading -----------------------------------------------------------------------------


def load_data_keys(db: str, kek, n: int) -> float:
    """``n`` real wrapped DEKs (local provider) COPYed in; returns seconds."""
    from keyvault.keys.services import recount_data_keys
    from keyvault.kms import get_provider
    from keyvault.models import wrapped_key_fingerprint

    provider = get_provider(kek.provider)
    started = time.perf_counter()
    columns = ("kek_id, kek_version, wrapped_key, fingerprint, key_spec, encryption_context, purpose, owner_ref, "
               "created_at")
    with c.connect(db) as conn, conn.cursor() as cur:
        with cur.copy(f"COPY keyvault_datakey ({columns}) FROM STDIN") as copy:
            lines = []
            for i in range(n):
                tenant = f"t{i % 997:04d}"
                dek = provider.generate_data_key(kek.provider_key_id, encryption_context={"tenant": tenant})
                dek.plaintext[:] = bytes(len(dek.plaintext))
                lines.append(
                    f"{kek.pk}\t{dek.key_version}\t\\\\x{dek.ciphertext.hex()}\t"
                    f"{wrapped_key_fingerprint(dek.ciphertext)}\tAES_256\t"
                    f'{{"tenant": "{tenant}"}}\tbench\towner-{i % 10007:05d}\tnow\n'
                )
                if len(lines) >= COPY_CHUNK:
                    copy.write("".join(lines))
                    lines.clear()
            if lines:
                copy.write("".join(lines))
        conn.commit()
    recount_data_keys()  # the rows came in around the key services, which keep the per-version counts
    return time.perf_counter() - started


def vacuum(db: str) -> None:
    import psycopg

    with psycopg.connect(dbname=db, autocommit=True, **c.PG) as conn:
        conn.execute("VACUUM (ANALYZE) keyvault_datakey")


# -- the floor ------------------------------------------------------------------------------


def floor_rewrap(db: str, kek, *, batch_size: int) -> tuple[int, float]:
    """Hand-written batched rewrap of every data key below the new primary version."""
    from keyvault.audit import Actor
    from keyvault.keys import services
    from keyvault.kms import get_provider
    from keyvault.models import wrapped_key_fingerprint as fingerprint

    target = services.rotate_kek_version(kek, actor=Actor.system("bench"), reason="bench floor").number
    provider = get_provider(kek.provider)
    rewrap, key_id = provider.rewrap, kek.provider_key_id
    done, after = 0, 0
    started = time.perf_counter()
    with c.connect(db) as conn, conn.cursor() as cur:
        cur.execute("CREATE TEMP TABLE rewrapped (id bigint, w bytea, ver integer, fp varchar(16)) "
                    "ON COMMIT DELETE ROWS")
        while True:
            cur.execute(
                "SELECT id, wrapped_key, encryption_context FROM keyvault_datakey "
                "WHERE kek_id = %s AND kek_version < %s AND id > %s ORDER BY id LIMIT %s",
                (kek.pk, target, after, batch_size),
            )
            rows = cur.fetchall()
            if not rows:
                break
            with cur.copy("COPY rewrapped (id, w, ver, fp) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(["int8", "bytea", "int4", "varchar"])
                for pk, wrapped, context in rows:
                    result = rewrap(wrapped, encryption_context=context, key_id=key_id)
                    # the row as the key services leave it: its stored fingerprint follows the wrapping
                    copy.write_row((pk, result.ciphertext, result.key_version, fingerprint(result.ciphertext)))
            # The id range steers the planner to index lookups (the scratch table has no statistics;
            # without it a batch of a few per cent of the table became a hash join over all of it).
            cur.execute(
                "UPDATE keyvault_datakey AS d SET wrapped_key = r.w, fingerprint = r.fp, kek_version = r.ver, "
                "last_rewrapped_at = now() "
                "FROM rewrapped AS r WHERE d.id = r.id AND d.id BETWEEN %s AND %s",
                (rows[0][0], rows[-1][0]),
            )
            conn.commit()
            done += len(rows)
            after = rows[-1][0]
    return done, time.perf_counter() - started


# -- the engine -------------------------------------------------------------------------------


def start_workers(env: dict, data_dir: Path, count: int) -> list[c.Process]:
    from keyvault.celery import app

    workers = [
        c.Process([c.PYTHON, "-m", "celery", "-A", "keyvault", "worker", "--concurrency", "1", "--pool", "prefork",
                   "-n", f"bench{i}@%h", "--without-gossip", "--without-mingle", "--loglevel", "WARNING"],
                  env, data_dir / f"worker{i}.log")
        for i in range(count)
    ]

    def ready():
        for worker in workers:
            if not worker.alive():
                raise RuntimeError(f"a worker exited:\n{worker.tail()}")
        return len(app.control.ping(timeout=0.5)) >= count

    c.wait_for(ready, timeout=60, what=f"{count} Celery worker(s)")
    return workers


def engine_rewrap(env: dict, data_dir: Path, kek, *, workers: int, n: int, timeout: float) -> dict:
    """A rotation run through ``start_run`` on ``workers`` real worker processes."""
    from keyvault.audit import Actor
    from rotation import services
    from rotation.models import RotationRun

    S = RotationRun.State
    processes = start_workers(env, data_dir, workers)
    try:
        started = time.perf_counter()
        run = services.start_run(kek=kek, actor=Actor.system("bench"), reason=f"bench: {workers} worker(s)")
        rewrap_start = rewrap_end = None
        deadline = started + timeout
        while time.perf_counter() < deadline:
            state = RotationRun.objects.filter(pk=run.pk).values_list("state", flat=True).get()
            now = time.perf_counter()
            if rewrap_start is None and state != S.QUEUED and state != S.ROTATING:
                rewrap_start = now
            if rewrap_end is None and state not in (S.QUEUED, S.ROTATING, S.REWRAPPING):
                rewrap_end = now
            if state in (S.COMPLETED, S.FAILED, S.CANCELLED, S.ROLLED_BACK):
                break
            time.sleep(0.02)
        else:
            raise TimeoutError(f"run #{run.pk} did not finish in {timeout:.0f} s ({state})")
        finished = time.perf_counter()
        run.refresh_from_db()
        if run.state != S.COMPLETED:
            raise RuntimeError(f"run #{run.pk} ended {run.state}: {run.last_error}")
    finally:
        for process in processes:
            process.stop()
    return {
        "run": run.pk, "rewrapped": run.rewrapped, "total": run.total_deks, "failed": run.failed_deks,
        "rewrap_s": rewrap_end - rewrap_start, "end_to_end_s": finished - started,
    }


# -- the naive loop -------------------------------------------------------------------------


def naive_rewrap(kek, sample: int) -> tuple[int, float]:
    """A per-row ORM loop: rewrap, ``save()`` (autocommit: one UPDATE and one commit per row)."""
    from django.utils import timezone

    from keyvault.audit import Actor
    from keyvault.keys import services
    from keyvault.kms import get_provider
    from keyvault.models import DataKey

    target = services.rotate_kek_version(kek, actor=Actor.system("bench"), reason="bench naive").number
    provider = get_provider(kek.provider)
    done = 0
    started = time.perf_counter()
    for data_key in DataKey.objects.filter(kek=kek, kek_version__lt=target).order_by("id")[:sample]:
        result = provider.rewrap(bytes(data_key.wrapped_key), encryption_context=data_key.encryption_context,
                                 key_id=kek.provider_key_id)
        data_key.wrapped_key = result.ciphertext
        data_key.kek_version = result.key_version
        data_key.last_rewrapped_at = timezone.now()
        data_key.save()
        done += 1
    return done, time.perf_counter() - started


# -- checks ---------------------------------------------------------------------------------


def check_all_on(kek, version: int, n: int, *, sample: int = 200) -> None:
    """Every data key is on ``version`` and a random sample opens under it."""
    from django.db.models import Count

    from keyvault.kms import get_provider
    from keyvault.models import DataKey

    counts = dict(DataKey.objects.filter(kek=kek).values_list("kek_version").annotate(n=Count("id")).order_by())
    if counts != {version: n}:
        raise RuntimeError(f"expected all {n} data keys on v{version}, found {counts}")
    provider = get_provider(kek.provider)
    for wrapped, context in DataKey.objects.filter(kek=kek).order_by("?").values_list(
            "wrapped_key", "encryption_context")[:sample]:
        opened = provider.decrypt(bytes(wrapped), encryption_context=context)
        if opened.key_version != version or len(opened.plaintext) != 32:
            raise RuntimeError("a rewrapped data key did not open under the new version")


def primary(kek) -> int:
    return kek.versions.get(is_primary=True).number


# -- main -----------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--provider", choices=("local", "vault", "aws", "gcp"), default="local")
    parser.add_argument("--n", type=int, help="data keys (default: 1 000 000 local, 20 000 vault, 1 000 aws/gcp)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds of every variant (default: 1 local, 3 remote)")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="added per request in front of moto/the emulator")
    parser.add_argument("--threads", type=int, default=16, help="requests in flight of the aws/gcp floors")
    parser.add_argument("--naive-sample", type=int, default=5000, help="rows for the per-row save() loop (local)")
    parser.add_argument("--floor-batch", type=int, default=5000, help="rows per batch of the local floor")
    parser.add_argument("--batch-size", type=int, default=None, help="HMD_ROTATION_BATCH_SIZE for the engine "
                        "(default: the product's default)")
    parser.add_argument("--partitions", type=int, default=None, help="HMD_ROTATION_PARTITIONS for the engine "
                        "(default: the product's default)")
    parser.add_argument("--kill", type=int, default=0, metavar="N", help="worker-kill mode (local only): an "
                        "undisturbed rotation, then one with a worker SIGKILLed N times (default --n 30 000)")
    parser.add_argument("--db", default="kv_bench_rewrap", help="PostgreSQL database (dropped and recreated)")
    parser.add_argument("--redis-url", default=REDIS_URL, help="Celery broker (its DB is flushed at start and end)")
    parser.add_argument("--data-dir", help="data folder (default: a temporary folder, removed at the end)")
    parser.add_argument("--keep", action="store_true", help="leave the database and data folder in place")
    args = parser.parse_args()
    if args.kill and args.provider != "local":
        parser.error("--kill runs on the local provider only")
    args.n = args.n or (KILL_N if args.kill else DEFAULT_N[args.provider])
    args.rounds = args.rounds or DEFAULT_ROUNDS[args.provider]
    return args


def measure_local(args, env, data_dir: Path, kek, rates: dict, timeout: float) -> dict:
    """Interleaved rounds of floor, engine x1, engine x2; then the naive loop once."""
    seconds = {}
    for round_number in range(1, args.rounds + 1):
        vacuum(args.db)
        c.log(f"round {round_number}: floor, hand-written psycopg rewrap in batches of {args.floor_batch}")
        done, elapsed = floor_rewrap(args.db, kek, batch_size=args.floor_batch)
        check_all_on(kek, primary(kek), args.n)
        rates["floor"].append(done / elapsed)
        for workers in (1, 2):
            vacuum(args.db)
            c.log(f"round {round_number}: engine, start_run on {workers} Celery worker process(es)")
            figures = run_engine(env, data_dir, kek, workers=workers, n=args.n, timeout=timeout, sample=200)
            rates[f"engine x{workers}"].append(args.n / figures["rewrap_s"])
            seconds.setdefault(f"engine x{workers}", []).append(figures["end_to_end_s"])
    vacuum(args.db)
    c.log(f"naive: per-row save() over {args.naive_sample:,} rows")
    done, elapsed = naive_rewrap(kek, args.naive_sample)
    rates["naive"].append(done / elapsed)
    return seconds


def measure_remote(args, env, data_dir: Path, kek, remote, rates: dict, timeout: float) -> dict:
    """Interleaved rounds of the server-direct floor, engine x1 and engine x2."""
    from bench import _remote
    from keyvault.audit import Actor
    from keyvault.keys import services

    seconds = {}
    for round_number in range(1, args.rounds + 1):
        target = services.rotate_kek_version(kek, actor=Actor.system("bench"), reason="bench floor").number
        rows = _remote.stored_rows(kek)
        c.log(f"round {round_number}: floor, {args.provider} server API directly")
        elapsed = _remote.floor(remote, kek, rows, target_version=target, threads=args.threads)
        rates["floor"].append(len(rows) / elapsed)
        for workers in (1, 2):
            c.log(f"round {round_number}: engine, start_run on {workers} Celery worker process(es)")
            figures = run_engine(env, data_dir, kek, workers=workers, n=args.n, timeout=timeout, sample=20)
            rates[f"engine x{workers}"].append(args.n / figures["rewrap_s"])
            seconds.setdefault(f"engine x{workers}", []).append(figures["end_to_end_s"])
    return seconds


def run_engine(env, data_dir: Path, kek, *, workers: int, n: int, timeout: float, sample: int) -> dict:
    figures = engine_rewrap(env, data_dir, kek, workers=workers, n=n, timeout=timeout)
    kek.refresh_from_db()
    check_all_on(kek, primary(kek), n, sample=sample)
    if (figures["rewrapped"], figures["failed"]) != (n, 0):
        raise RuntimeError(f"engine run incomplete: {figures}")
    return figures


def targets(provider: str, rate: dict) -> list[tuple[str, str, str, bool]]:
    """(what, measured, target, met) for every target of ``provider``."""
    wanted = ENGINE_VS_FLOOR_TARGET[provider]
    found = []
    for name in ("engine x1", "engine x2"):
        ratio = rate[name] / rate["floor"]
        found.append((f"{name} / floor", f"{ratio:.0%}", f">= {wanted:.0%}", ratio >= wanted))
    if provider == "local":
        found.append(("engine x2, 1M data keys", f"{1_000_000 / rate['engine x2']:.1f} s",
                      f"<= {1_000_000 / LOCAL_X2_TARGET:.0f} s", rate["engine x2"] >= LOCAL_X2_TARGET))
    return found


def report(args, description: str, load_s: float, rates: dict, seconds: dict, started: float) -> bool:
    from django.conf import settings

    rate = {name: c.median(values) for name, values in rates.items() if values}
    print()
    print(f"Keyvault rewrap benchmark: {args.n:,} real wrapped DEKs, provider {args.provider} ({description}); "
          f"PostgreSQL; {os.cpu_count()} CPUs shared by workers, servers, PostgreSQL and this process; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"load: {load_s:.1f} s; engine: batch {settings.ROTATION_BATCH_SIZE}, {settings.ROTATION_PARTITIONS} "
          f"partitions; {args.rounds} interleaved round(s), medians")
    print()
    rows = []
    for name, values in rates.items():
        if not values:
            continue
        end_to_end = f"{c.median(seconds[name]):.1f}" if name in seconds else "-"
        rows.append((name, len(values), f"{rate[name]:,.0f}", f"{min(values):,.0f}", f"{max(values):,.0f}",
                     end_to_end, f"{rate[name] / rate['floor']:.0%}"))
    c.print_table(("variant", "rounds", "DEKs/s (median)", "min", "max", "end-to-end s", "of floor"), rows)
    print()
    found = targets(args.provider, rate)
    c.print_table(("target", "measured", "wanted", "result"),
                  [(what, measured, wanted, "MET" if ok else "NOT MET") for what, measured, wanted, ok in found])
    if "naive" in rate:
        print(f"\n(informational) engine x1 / naive {rate['engine x1'] / rate['naive']:.1f}x, "
              f"engine x2 / naive {rate['engine x2'] / rate['naive']:.1f}x (issue 4 asked >= {ENGINE_VS_NAIVE_INFO:.0f}x)")
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s")
    return all(ok for *_, ok in found)


def main() -> int:
    args = parse_args()
    import contextlib

    import redis

    from bench import _remote

    data_dir, own_dir = c.make_data_dir(args.data_dir, "kv-bench-rewrap-")
    broker = redis.Redis.from_url(args.redis_url)
    broker.flushdb()
    timeout = max(300.0, args.n / (1000 if args.provider == "local" else 20))
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        remote = None
        if args.provider != "local":
            c.log(f"starting the {args.provider} server")
            remote = stack.enter_context(_remote.serving(args.provider, data_dir, delay_ms=args.delay_ms))
        extra = {"HMD_BROKER_URL": args.redis_url, "HMD_ROTATION_RATE_LIMITS": "local=0,vault=0,aws=0,gcp=0",
                 **(remote.env if remote else {})}
        if args.batch_size:
            extra["HMD_ROTATION_BATCH_SIZE"] = str(args.batch_size)
        if args.partitions:
            extra["HMD_ROTATION_PARTITIONS"] = str(args.partitions)
        env = c.instance_env(data_dir, args.db, **extra)
        try:
            c.log(f"creating database {args.db} and migrating")
            c.create_database(args.db)
            c.manage(env, "migrate", "-v0")
            c.setup_django(env)
            from keyvault.audit import Actor
            from keyvault.keys import services
            from rotation import services as rotation

            kek = services.create_kek(name=KEK_NAME, actor=Actor.system("bench"), provider_name=args.provider)
            rotation.update_policy(kek, actor=Actor.system("bench"), approvals_required=0, grace_period=timedelta(0))
            kek.refresh_from_db()
            c.log(f"wrapping {args.n:,} real DEKs with the {args.provider} provider and COPYing them in")
            if remote:
                load_s = _remote.load_data_keys(args.db, kek, args.n, threads=args.threads)
            else:
                load_s = load_data_keys(args.db, kek, args.n)
            check_all_on(kek, 1, args.n, sample=200 if remote is None else 20)

            if args.kill:
                from bench import _workerkill

                return 0 if _workerkill.measure(args, env, data_dir, kek, timeout) else 1
            rates = {"floor": [], "engine x1": [], "engine x2": [], "naive": []}
            if remote:
                seconds = measure_remote(args, env, data_dir, kek, remote, rates, timeout)
            else:
                seconds = measure_local(args, env, data_dir, kek, rates, timeout)
            ok = report(args, remote.description if remote else "local keyring, AES-256-GCM", load_s, rates,
                        seconds, started)
            return 0 if ok else 1
        finally:
            if not args.keep:
                from django.db import connections

                connections.close_all()
                c.drop_database(args.db)
                broker.flushdb()
                if own_dir:
                    c.remove_dir(data_dir)


if __name__ == "__main__":
    sys.exit(main())
