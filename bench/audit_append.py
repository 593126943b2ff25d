"""Audit chain append throughput on PostgreSQL: serial (before) against group commit, and the floor (issue 17).

    .venv/bin/python bench/audit_append.py [--rounds 5] [--seconds 2] [--writers 1,32] [--api-processes 8] [--strict]

One call is what a key service does: ``with transaction.atomic(): audit.record(...)``, the
event recorded in the caller's transaction. Each writer is its own process (forked after
``django.setup()``, its own connection), calling in a loop for ``--seconds``.

* ``serial``        ``HMD_AUDIT_GROUP_COMMIT=false``: the chain head locked in the caller's
                    transaction, one commit per event (the path before issue 17).
* ``group commit``  the event goes to the outbox in the caller's transaction; after its commit
                    the caller appends every committed outbox event in one short transaction
                    unless another caller is appending already (it then takes this one too).
* ``api rounds``    what an API call does instead: ``audit.record(...)`` outside any transaction,
                    the writers being threads of ``--api-processes`` processes (as gunicorn's
                    gthread workers); one process's concurrent callers are appended in rounds,
                    one statement each (keyvault/audit/batcher.py). Each call returns once its
                    event is committed in the chain.
* ``api one each``  the same calls with every event appended in a statement of its own, as
                    before the rounds (the bench calls the round function directly: one call,
                    one statement); the baseline of ``api rounds``.

events/s = calls by all writers / wall time from the common start until the last call's event
is **in the chain** (for group commit: until the outbox is empty, not merely until the last
call returned). Events a capped appender left behind for beat's sweep are counted and appended
by the bench after the clock stops (printed; 0 expected).

The floor, measured in the same rounds, is PostgreSQL doing the equivalent work without
Keyvault: one outbox-sized row inserted and committed per transaction, into a copy of the
outbox table, by (a) ``pgbench`` with the same number of clients (C, no Python) and (b) the
same number of Python processes through psycopg without Django. Group commit cannot beat (b):
every call costs at least that insert and commit, and the append comes on top.

Rounds interleave every (mode, writers) pair, the order rotating each round; the figure of
record is the median over rounds. Then ``manage.py audit verify`` checks the whole chain,
and the event count must equal the calls made (one event per call, none left in the outbox).
Target: group commit >= 5,000 events/s with 32 writers. A private database and data folder
are created and removed (``--keep`` leaves them). Exits 0 unless ``--strict`` and a target
or a check fails.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _common as common  # noqa: E402

TARGET_EVENTS_PER_SECOND = 5000
TARGET_WRITERS = 32
MODES = ("serial", "group commit", "api one each", "api rounds", "floor: psycopg", "floor: pgbench")
FLOOR_TABLE = "bench_floor_outbox"
FLOOR_INSERT = (f"INSERT INTO {FLOOR_TABLE} (timestamp, actor, action, target_type, target_id, outcome, "
                "request_id, ip_address, details) VALUES (now(), %s, 'other', 'bench', %s, 'success', '', NULL, "
                "%s::jsonb)")
API_PROCESSES = 8  # --api-processes default: web processes the "api rounds" writers are threads of
CHAIN_WAIT_SECONDS = 10.0  # how long the bench waits for the outbox to empty after the last call


def _writer(group_commit: bool, barrier, seconds: float, results, name: str) -> None:
    from django.conf import settings
    from django.db import connection, transaction

    from keyvault import audit
    from keyvault.audit import Action, Actor

    settings.AUDIT_GROUP_COMMIT = group_commit
    actor = Actor.system(name)
    connection.ensure_connection()
    barrier.wait()
    start = time.monotonic()
    calls = 0
    while time.monotonic() - start < seconds:
        with transaction.atomic():
            audit.record(Action.OTHER, actor=actor, target=("bench", name), details={"call": calls})
        calls += 1
    results.put((calls, time.monotonic()))
    connection.close()


def _api_writers(threads: int, rounds: bool, barrier, seconds: float, results, name: str) -> None:
    """``threads`` writer threads in this process, each recording outside any transaction (as an API call)."""
    import threading

    from django.db import connection

    from keyvault import audit
    from keyvault.audit import Action, Actor

    if not rounds:  # the baseline: each caller's event in a statement of its own
        audit._own_statement_appends.submit = audit._append_round

    ready, go, counts, ends = threading.Barrier(threads + 1), threading.Event(), [], []

    def write(number: int) -> None:
        actor = Actor.system(f"{name}-{number}")
        connection.ensure_connection()
        ready.wait()
        go.wait()
        start, calls = time.monotonic(), 0
        while time.monotonic() - start < seconds:
            audit.record(Action.OTHER, actor=actor, target=("bench", name), details={"call": calls})
            calls += 1
        counts.append(calls)
        ends.append(time.monotonic())
        connection.close()

    workers = [threading.Thread(target=write, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    ready.wait()
    barrier.wait()
    go.set()
    for worker in workers:
        worker.join()
    results.put((sum(counts), max(ends)))


def _psycopg_writer(db: str, barrier, seconds: float, results, name: str) -> None:
    connection = common.connect(db)
    barrier.wait()
    start = time.monotonic()
    calls = 0
    while time.monotonic() - start < seconds:
        with connection.transaction():
            connection.execute(FLOOR_INSERT, (f"system:{name}", name, json.dumps({"call": calls})))
        calls += 1
    results.put((calls, time.monotonic()))
    connection.close()


def _run_processes(target, args_for, writers: int, seconds: float) -> tuple[float, int, float]:
    """(start, calls, time of the last call) for ``writers`` forked processes (each reports once)."""
    from django.db import connections

    connections.close_all()  # each forked writer opens its own
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(writers + 1)
    results = context.Queue()
    processes = [context.Process(target=target, args=(*args_for(n), barrier, seconds, results, f"bench-{writers}-{n}"))
                 for n in range(writers)]
    for process in processes:
        process.start()
    barrier.wait()
    start = time.monotonic()
    outcomes = [results.get(timeout=seconds + 120) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        if process.exitcode != 0:
            raise RuntimeError(f"a writer exited {process.exitcode}")
    return start, sum(count for count, _ in outcomes), max(end for _, end in outcomes)


def _outbox_empty_at(deadline: float) -> float | None:
    """When the outbox was first seen empty (polling), or None if not by ``deadline``."""
    from keyvault.models import AuditPendingEvent

    while time.monotonic() < deadline:
        if not AuditPendingEvent.objects.exists():
            return time.monotonic()
        time.sleep(0.001)
    return None


def measure_keyvault(mode: str, writers: int, seconds: float, swept: list[int],
                     api_processes: int = API_PROCESSES) -> tuple[float, int]:
    """(events/s until every event is in the chain, calls) for ``writers`` Keyvault writer processes."""
    from keyvault import audit

    if mode in ("api rounds", "api one each"):
        processes = min(api_processes, writers)
        threads = [writers // processes + (n < writers % processes) for n in range(processes)]
        start, calls, last_call = _run_processes(_api_writers, lambda n: (threads[n], mode == "api rounds"),
                                                 processes, seconds)
        return calls / (last_call - start), calls
    start, calls, last_call = _run_processes(_writer, lambda n: (mode == "group commit",), writers, seconds)
    chained = _outbox_empty_at(last_call + CHAIN_WAIT_SECONDS) if mode == "group commit" else last_call
    if chained is None:  # left for beat's sweep: appended here, off the clock, and reported
        swept.append(audit.drain_all_pending())
        chained = last_call + CHAIN_WAIT_SECONDS
    return calls / (chained - start), calls


def measure_psycopg_floor(db: str, writers: int, seconds: float) -> float:
    start, calls, last_call = _run_processes(_psycopg_writer, lambda n: (db,), writers, seconds)
    return calls / (last_call - start)


def measure_pgbench_floor(db: str, writers: int, seconds: float) -> float | None:
    """pgbench's tps (excluding connection setup) for the same insert and commit, or None without pgbench."""
    pgbench = shutil.which("pgbench")
    if pgbench is None:
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".sql") as script:
        insert = FLOOR_INSERT.replace("%s::jsonb", "'{\"call\": 1}'").replace("%s", "'system:pgbench'")
        script.write(f"BEGIN;\n{insert};\nCOMMIT;\n")
        script.flush()
        output = subprocess.run(
            [pgbench, "-n", "-h", common.PG["host"], "-p", str(common.PG["port"]), "-U", common.PG["user"],
             "-c", str(writers), "-j", str(min(writers, os.cpu_count() or 1)), "-T", str(max(1, round(seconds))),
             "-f", script.name, db], capture_output=True, text=True, check=True).stdout
    match = re.search(r"tps = ([0-9.]+)", output)
    return float(match.group(1)) if match else None


def _create_floor_table(db: str) -> None:
    with common.connect(db) as connection:
        connection.execute(f"CREATE TABLE {FLOOR_TABLE} (LIKE keyvault_auditpendingevent INCLUDING ALL)")


def _server_settings(db: str) -> str:
    with common.connect(db) as connection:
        values = [connection.execute(f"SHOW {name}").fetchone()[0]
                  for name in ("synchronous_commit", "commit_delay", "fsync", "wal_sync_method")]
    return "synchronous_commit={}, commit_delay={}, fsync={}, wal_sync_method={}".format(*values)


def measure(mode: str, writers: int, seconds: float, db: str, swept: list[int],
            api_processes: int = API_PROCESSES) -> tuple[float | None, int]:
    if mode == "floor: psycopg":
        return measure_psycopg_floor(db, writers, seconds), 0
    if mode == "floor: pgbench":
        return measure_pgbench_floor(db, writers, seconds), 0
    return measure_keyvault(mode, writers, seconds, swept, api_processes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one measurement")
    parser.add_argument("--writers", default=f"1,{TARGET_WRITERS}", help="comma-separated writer counts")
    parser.add_argument("--db", default="kv_bench_audit_append", help="private database (dropped and created)")
    parser.add_argument("--data-dir")
    parser.add_argument("--keep", action="store_true", help="keep the database and data folder")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a target or check fails")
    parser.add_argument("--api-processes", type=int, default=API_PROCESSES,
                        help="processes the api-rounds writers are threads of")
    args = parser.parse_args()
    writer_counts = [int(n) for n in args.writers.split(",")]

    data_dir, made_dir = common.make_data_dir(args.data_dir, "kv-bench-audit-")
    common.create_database(args.db)
    try:
        env = common.instance_env(data_dir, args.db)
        common.log(f"migrating {args.db}")
        common.manage(env, "migrate", "--no-input")
        common.setup_django(env)
        from keyvault.models import AuditEvent, AuditPendingEvent

        _create_floor_table(args.db)
        events_before = AuditEvent.objects.count()
        configs = [(mode, writers) for writers in writer_counts for mode in MODES]
        figures: dict[tuple[str, int], list[float]] = {config: [] for config in configs}
        total_calls, swept = 0, []
        for round_number in range(args.rounds):
            shift = round_number % len(configs)
            for mode, writers in configs[shift:] + configs[:shift]:
                rate, calls = measure(mode, writers, args.seconds, args.db, swept, args.api_processes)
                if rate is not None:
                    figures[(mode, writers)].append(rate)
                total_calls += calls
            common.log(f"round {round_number + 1}/{args.rounds}: " + ", ".join(
                f"{mode} x{writers} {figures[(mode, writers)][-1]:,.0f}/s"
                for mode, writers in configs if figures[(mode, writers)]))

        print()
        print(f"Audit append on PostgreSQL, events/s (in the chain), median of {args.rounds} interleaved rounds "
              f"of {args.seconds:g} s; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end "
              "(a shared machine: other jobs run alongside)")
        print(f"server as it is: {_server_settings(args.db)}")

        def median_of(mode: str, writers: int) -> float | None:
            return common.median(figures[(mode, writers)]) if figures[(mode, writers)] else None

        rows = []
        for writers in writer_counts:
            serial, grouped = median_of("serial", writers), median_of("group commit", writers)
            rounds, one_each_api = median_of("api rounds", writers), median_of("api one each", writers)
            floor, pgbench = median_of("floor: psycopg", writers), median_of("floor: pgbench", writers)
            rows.append([writers, f"{serial:,.0f}", f"{grouped:,.0f}", f"{grouped / serial:.2f}x",
                         f"{one_each_api:,.0f}", f"{rounds:,.0f}", f"{floor:,.0f}", f"{grouped / floor:.2f}",
                         f"{pgbench:,.0f}" if pgbench else "n/a",
                         f"{grouped / TARGET_EVENTS_PER_SECOND:.2f}", f"{rounds / TARGET_EVENTS_PER_SECOND:.2f}"])
        common.print_table(["writers", "serial (before)", "group commit", "vs serial",
                            "api one each", f"api rounds ({args.api_processes} proc)", "floor psycopg", "gc/floor", "floor pgbench",
                            "gc/target", "api/target"], rows)

        print()
        pending = AuditPendingEvent.objects.count()
        appended = AuditEvent.objects.count() - events_before
        one_each = pending == 0 and appended == total_calls
        print(f"calls {total_calls:,}, events appended {appended:,}, left in the outbox {pending}, "
              f"left for beat's sweep after a run {sum(swept)}: {'one event per call' if one_each else 'MISMATCH'}")
        _, verified = common.manage(env, "audit", "verify")
        chain_ok = verified.splitlines()[-1].startswith("OK") if verified else False
        print(f"manage.py audit verify: {verified.splitlines()[-1] if verified else '(no output)'}")
        target_ok = False
        if TARGET_WRITERS in writer_counts:
            grouped = median_of("group commit", TARGET_WRITERS)
            floor = median_of("floor: psycopg", TARGET_WRITERS)
            rounds = median_of("api rounds", TARGET_WRITERS)
            target_ok = grouped >= TARGET_EVENTS_PER_SECOND
            print(f"target: group commit >= {TARGET_EVENTS_PER_SECOND:,} events/s with {TARGET_WRITERS} writers: "
                  f"{grouped:,.0f}/s ({grouped / TARGET_EVENTS_PER_SECOND:.0%} of it) -> "
                  f"{'MET' if target_ok else 'NOT MET'}; PostgreSQL's own floor through psycopg here is "
                  f"{floor:,.0f}/s ({floor / TARGET_EVENTS_PER_SECOND:.0%} of the target)")
            print(f"  the API's path (calls outside a transaction, {TARGET_WRITERS} threads in {args.api_processes} "
                  f"processes, appended in rounds): {rounds:,.0f}/s "
                  f"({'at' if rounds >= TARGET_EVENTS_PER_SECOND else 'below'} the target; key services' calls "
                  "inside a transaction take the group-commit path above)")
        else:
            print(f"target: not measured (run with {TARGET_WRITERS} writers)")
        return 1 if args.strict and not (target_ok and chain_ok and one_each) else 0
    finally:
        if not args.keep:
            common.discard_instance(args.db, data_dir, made_dir)


if __name__ == "__main__":
    sys.exit(main())
