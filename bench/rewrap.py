#!/usr/bin/env python
"""Bulk rewrap throughput of the rotation engine against a hand-written floor (Keyvault issue 4).

    .venv/bin/python bench/rewrap.py [--n 1000000] [--naive-sample 5000] [--keep]

1. Fresh PostgreSQL database (default ``kv_bench_rewrap``), ``manage.py migrate``, one KEK
   created through ``keyvault.keys.services.create_kek`` at the local provider, rotation policy
   with no approvals and no grace period (so each run completes).
2. Loads ``--n`` data keys: each a real DEK wrapped by the local provider
   (``generate_data_key``, with a per-tenant encryption context), streamed in with ``COPY``.
3. In one run, each measurement rewrapping every data key from the old version to a new one
   (``VACUUM ANALYZE`` before each, so no measurement pays for the previous one's dead rows):

   * ``floor``      the best hand-written psycopg 3 loop: keyset-paged ``SELECT`` of a batch,
                    the local provider's ``rewrap`` per row, ``COPY`` into a temporary table and
                    one ``UPDATE … FROM`` per batch, one commit per batch; one process.
   * ``engine x1``  ``rotation.services.start_run`` with a real Celery worker
                    (``celery -A keyvault worker --concurrency 1``), Redis broker on DB 9.
   * ``engine x2``  the same with two such worker processes.
   * ``naive``      a per-row ORM ``save()`` loop (autocommit, one UPDATE and commit per row)
                    over ``--naive-sample`` rows, extrapolated to data keys per second.

   The engine's figure is its rewrap phase (from the run entering *rewrapping* to it leaving
   it, polled every 20 ms); the start (health check, audit-chain check, new version) and the
   verification are printed separately as end-to-end time.
4. Checks that every data key ends on the newest version and that a sample decrypts, prints
   DEKs/s and the ratios against the targets: engine >= 50% of the floor, >= 30x naive.

Workers, PostgreSQL and this process share the machine's CPUs (two on the reference box),
so two workers compete with the database; the CPU count is printed with the figures.
Database, Redis DB 9, data folder and workers are cleaned up at the end unless ``--keep``.
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
ENGINE_VS_FLOOR_TARGET = 0.5
ENGINE_VS_NAIVE_TARGET = 30.0


# -- loading -----------------------------------------------------------------------------


def load_data_keys(db: str, kek, n: int) -> float:
    """``n`` real wrapped DEKs (local provider) COPYed in; returns seconds."""
    from keyvault.kms import get_provider

    provider = get_provider(kek.provider)
    started = time.perf_counter()
    columns = "kek_id, kek_version, wrapped_key, key_spec, encryption_context, purpose, owner_ref, created_at"
    with c.connect(db) as conn, conn.cursor() as cur:
        with cur.copy(f"COPY keyvault_datakey ({columns}) FROM STDIN") as copy:
            lines = []
            for i in range(n):
                tenant = f"t{i % 997:04d}"
                dek = provider.generate_data_key(kek.provider_key_id, encryption_context={"tenant": tenant})
                dek.plaintext[:] = bytes(len(dek.plaintext))
                lines.append(
                    f"{kek.pk}\t{dek.key_version}\t\\\\x{dek.ciphertext.hex()}\tAES_256\t"
                    f'{{"tenant": "{tenant}"}}\tbench\towner-{i % 10007:05d}\tnow\n'
                )
                if len(lines) >= COPY_CHUNK:
                    copy.write("".join(lines))
                    lines.clear()
            if lines:
                copy.write("".join(lines))
        conn.commit()
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

    target = services.rotate_kek_version(kek, actor=Actor.system("bench"), reason="bench floor").number
    provider = get_provider(kek.provider)
    rewrap, key_id = provider.rewrap, kek.provider_key_id
    done, after = 0, 0
    started = time.perf_counter()
    with c.connect(db) as conn, conn.cursor() as cur:
        cur.execute("CREATE TEMP TABLE rewrapped (id bigint, w bytea, ver integer) ON COMMIT DELETE ROWS")
        while True:
            cur.execute(
                "SELECT id, wrapped_key, encryption_context FROM keyvault_datakey "
                "WHERE kek_id = %s AND kek_version < %s AND id > %s ORDER BY id LIMIT %s",
                (kek.pk, target, after, batch_size),
            )
            rows = cur.fetchall()
            if not rows:
                break
            with cur.copy("COPY rewrapped (id, w, ver) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(["int8", "bytea", "int4"])
                for pk, wrapped, context in rows:
                    result = rewrap(wrapped, encryption_context=context, key_id=key_id)
                    copy.write_row((pk, result.ciphertext, result.key_version))
            cur.execute(
                "UPDATE keyvault_datakey AS d SET wrapped_key = r.w, kek_version = r.ver, last_rewrapped_at = now() "
                "FROM rewrapped AS r WHERE d.id = r.id"
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="data keys (default 1 000 000)")
    parser.add_argument("--naive-sample", type=int, default=5000, help="rows for the per-row save() loop")
    parser.add_argument("--floor-batch", type=int, default=5000, help="rows per batch of the hand-written floor")
    parser.add_argument("--batch-size", type=int, default=None, help="HMD_ROTATION_BATCH_SIZE for the engine "
                        "(default: the product's default)")
    parser.add_argument("--partitions", type=int, default=None, help="HMD_ROTATION_PARTITIONS for the engine "
                        "(default: the product's default)")
    parser.add_argument("--db", default="kv_bench_rewrap", help="PostgreSQL database (dropped and recreated)")
    parser.add_argument("--data-dir", help="data folder (default: a temporary folder, removed at the end)")
    parser.add_argument("--keep", action="store_true", help="leave the database and data folder in place")
    args = parser.parse_args()

    import redis

    data_dir, own_dir = c.make_data_dir(args.data_dir, "kv-bench-rewrap-")
    extra = {"HMD_BROKER_URL": REDIS_URL}
    if args.batch_size:
        extra["HMD_ROTATION_BATCH_SIZE"] = str(args.batch_size)
    if args.partitions:
        extra["HMD_ROTATION_PARTITIONS"] = str(args.partitions)
    env = c.instance_env(data_dir, args.db, **extra)
    broker = redis.Redis.from_url(REDIS_URL)
    broker.flushdb()
    timeout = max(300.0, args.n / 1000)  # no run may take longer than 1 ms per data key
    total_started = time.perf_counter()
    try:
        c.log(f"creating database {args.db} and migrating")
        c.create_database(args.db)
        c.manage(env, "migrate", "-v0")
        c.setup_django(env)
        from django.conf import settings

        from keyvault.audit import Actor
        from keyvault.keys import services
        from rotation import services as rotation

        kek = services.create_kek(name=KEK_NAME, actor=Actor.system("bench"))
        rotation.update_policy(kek, actor=Actor.system("bench"), approvals_required=0, grace_period=timedelta(0))
        kek.refresh_from_db()

        c.log(f"wrapping {args.n:,} real DEKs with the local provider and COPYing them in")
        load_s = load_data_keys(args.db, kek, args.n)
        check_all_on(kek, 1, args.n)

        results = {}
        vacuum(args.db)
        c.log(f"floor: hand-written psycopg rewrap, batches of {args.floor_batch}")
        done, seconds = floor_rewrap(args.db, kek, batch_size=args.floor_batch)
        check_all_on(kek, primary(kek), args.n)
        results["floor"] = (done, seconds)

        for workers in (1, 2):
            vacuum(args.db)
            c.log(f"engine: start_run on {workers} Celery worker process(es)")
            figures = engine_rewrap(env, data_dir, kek, workers=workers, n=args.n, timeout=timeout)
            kek.refresh_from_db()
            check_all_on(kek, primary(kek), args.n)
            if (figures["rewrapped"], figures["failed"]) != (args.n, 0):
                raise RuntimeError(f"engine run incomplete: {figures}")
            results[f"engine x{workers}"] = (args.n, figures["rewrap_s"], figures["end_to_end_s"])

        vacuum(args.db)
        c.log(f"naive: per-row save() over {args.naive_sample:,} rows")
        results["naive"] = naive_rewrap(kek, args.naive_sample)

        rate = {name: figures[0] / figures[1] for name, figures in results.items()}
        print()
        print(f"Keyvault rewrap benchmark: {args.n:,} real wrapped DEKs (local provider, AES-256-GCM), "
              f"PostgreSQL, {os.cpu_count()} CPUs shared by workers, PostgreSQL and this process")
        print(f"load: {load_s:.1f} s ({args.n / load_s:,.0f} DEKs/s generated, wrapped and COPYed); engine: "
              f"batch {settings.ROTATION_BATCH_SIZE}, {settings.ROTATION_PARTITIONS} partitions; "
              f"floor: batch {args.floor_batch}")
        print()
        rows = []
        for name, figures in results.items():
            end_to_end = f"{figures[2]:.1f}" if len(figures) > 2 else "-"
            rows.append((name, f"{figures[0]:,}", f"{figures[1]:.1f}", end_to_end, f"{rate[name]:,.0f}",
                         f"{rate[name] / rate['floor']:.0%}"))
        c.print_table(("variant", "DEKs", "rewrap s", "end-to-end s", "DEKs/s", "of floor"), rows)
        print()
        ratio_rows = []
        for name in ("engine x1", "engine x2"):
            vs_floor = rate[name] / rate["floor"]
            vs_naive = rate[name] / rate["naive"]
            ratio_rows.append((name, f"{vs_floor:.0%}", c.met(vs_floor >= ENGINE_VS_FLOOR_TARGET),
                               f"{vs_naive:.1f}x", c.met(vs_naive >= ENGINE_VS_NAIVE_TARGET)))
        c.print_table(("engine", "vs floor", f">= {ENGINE_VS_FLOOR_TARGET:.0%}", "vs naive",
                       f">= {ENGINE_VS_NAIVE_TARGET:.0f}x"), ratio_rows)
        print(f"\ntotal wall time {time.perf_counter() - total_started:.0f} s")
        ok = all(rate[name] >= ENGINE_VS_FLOOR_TARGET * rate["floor"] and
                 rate[name] >= ENGINE_VS_NAIVE_TARGET * rate["naive"] for name in ("engine x1", "engine x2"))
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
