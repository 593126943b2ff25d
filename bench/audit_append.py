#!/usr/bin/env python
"""Audit chain append throughput on PostgreSQL: serial (before) against group commit (issue 17).

    .venv/bin/python bench/audit_append.py [--rounds 5] [--seconds 2] [--writers 1,32] [--strict]

One call is what a key service does: ``with transaction.atomic(): audit.record(...)`` —
the event recorded in the caller's transaction, returning once the event is in the chain.
Each writer is its own process (forked after ``django.setup()``, its own connection),
calling in a loop for ``--seconds``; events/s = calls completed by all writers / wall
time from the common start to the last writer's last call.

* ``serial``        ``HMD_AUDIT_GROUP_COMMIT=false``: the chain head locked in the caller's
                    transaction, one commit per event (the path before issue 17).
* ``group commit``  the default on PostgreSQL: the event goes to the outbox in the caller's
                    transaction and is appended with every other committed one in one short
                    transaction under the head lock.

Rounds interleave every (mode, writers) pair, the order rotating each round; the figure of
record is the median over rounds. Then ``manage.py audit verify`` checks the whole chain,
and the event count must equal the calls made (one event per call, none left in the outbox).
Target: group commit ≥ 5,000 events/s with 32 writers. A private database and data folder
are created and removed (``--keep`` leaves them). Exits 0 unless ``--strict`` and a target
or a check fails.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _common as common  # noqa: E402

TARGET_EVENTS_PER_SECOND = 5000
TARGET_WRITERS = 32
MODES = ("serial", "group commit")


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


def measure(mode: str, writers: int, seconds: float) -> tuple[float, int]:
    """(events/s, calls) for one run of ``writers`` processes."""
    from django.db import connections

    connections.close_all()  # each forked writer opens its own
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(writers + 1)
    results = context.Queue()
    processes = [context.Process(target=_writer, args=(mode == "group commit", barrier, seconds, results,
                                                       f"bench-{writers}-{n}"))
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
    calls = sum(count for count, _ in outcomes)
    elapsed = max(end for _, end in outcomes) - start
    return calls / elapsed, calls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one measurement")
    parser.add_argument("--writers", default=f"1,{TARGET_WRITERS}", help="comma-separated writer counts")
    parser.add_argument("--db", default="kv_bench_audit_append", help="private database (dropped and created)")
    parser.add_argument("--data-dir")
    parser.add_argument("--keep", action="store_true", help="keep the database and data folder")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a target or check fails")
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

        events_before = AuditEvent.objects.count()
        configs = [(mode, writers) for writers in writer_counts for mode in MODES]
        figures: dict[tuple[str, int], list[float]] = {config: [] for config in configs}
        total_calls = 0
        for round_number in range(args.rounds):
            shift = round_number % len(configs)
            for mode, writers in configs[shift:] + configs[:shift]:
                rate, calls = measure(mode, writers, args.seconds)
                figures[(mode, writers)].append(rate)
                total_calls += calls
            common.log(f"round {round_number + 1}/{args.rounds}: " + ", ".join(
                f"{mode} x{writers} {figures[(mode, writers)][-1]:,.0f}/s" for mode, writers in configs))

        print()
        print(f"Audit append on PostgreSQL, events/s, median of {args.rounds} interleaved rounds of "
              f"{args.seconds:g} s ({os.cpu_count()} CPUs)")
        rows = []
        for writers in writer_counts:
            serial = common.median(figures[("serial", writers)])
            grouped = common.median(figures[("group commit", writers)])
            rows.append([writers, f"{serial:,.0f}", f"{grouped:,.0f}", f"{grouped / serial:.1f}x",
                         f"{min(figures[('group commit', writers)]):,.0f}-{max(figures[('group commit', writers)]):,.0f}"])
        common.print_table(["writers", "serial (before)", "group commit", "speed-up", "group commit range"], rows)

        print()
        pending = AuditPendingEvent.objects.count()
        appended = AuditEvent.objects.count() - events_before
        one_each = pending == 0 and appended == total_calls
        print(f"calls {total_calls:,}, events appended {appended:,}, left in the outbox {pending}: "
              f"{'one event per call' if one_each else 'MISMATCH'}")
        _, verified = common.manage(env, "audit", "verify")
        chain_ok = verified.splitlines()[-1].startswith("OK") if verified else False
        print(f"manage.py audit verify: {verified.splitlines()[-1] if verified else '(no output)'}")
        target_ok = False
        if TARGET_WRITERS in writer_counts:
            grouped = common.median(figures[("group commit", TARGET_WRITERS)])
            target_ok = grouped >= TARGET_EVENTS_PER_SECOND
            print(f"target: group commit >= {TARGET_EVENTS_PER_SECOND:,} events/s with {TARGET_WRITERS} writers: "
                  f"{grouped:,.0f}/s -> {'MET' if target_ok else 'NOT MET'}")
        else:
            print(f"target: not measured (run with {TARGET_WRITERS} writers)")
        return 1 if args.strict and not (target_ok and chain_ok and one_each) else 0
    finally:
        if not args.keep:
            common.discard_instance(args.db, data_dir, made_dir)


if __name__ == "__main__":
    sys.exit(main())
