#!/usr/bin/env python
"""The application API under load on PostgreSQL, against OpenBao Transit in the same run (issue 17).

    .venv/bin/python bench/api.py [--seconds 30] [--connections 64] [--rounds 3]
                                  [--group-commit off,on] [--strict]

1. Creates a private database and data folder, migrates, creates a local KEK, an API
   client (``unwrap,generate``, context ``service=bench`` required, a rate limit counted
   in the shared cache ``--cache-url``) and ``--data-keys`` data keys through the API.
2. Runs the production web process (gunicorn with ``deploy/gunicorn.conf.py``: gthread,
   access log on) — one per audit mode in ``--group-commit`` (``HMD_AUDIT_GROUP_COMMIT``)
   — and ``bao server -dev`` with a file audit device and Transit.
3. Rounds interleave, the order rotating: Keyvault ``POST /api/v1/data-keys/{id}/unwrap``
   (single), Keyvault ``POST /api/v1/data-keys/unwrap`` with 100 ids a call (batch),
   OpenBao ``POST /v1/transit/decrypt/bench`` of a wrapped 32-byte data key. One load
   client for all: ``wrk`` with ``--connections`` keep-alive connections for ``--seconds``.
   Figures of record: medians over rounds of requests/s, DEKs/s, p50 and p99 (wrk's).
4. Checks the audit chain (``manage.py audit verify``) and that the unwrap events in it
   equal the unwraps the servers answered (from gunicorn's access log: single 200s +
   100 x batch 200s), none left in the outbox.

Targets: single unwrap >= 25 % of OpenBao's requests/s; p99 <= 50 ms; batch >= 20,000 DEKs/s.
A missed one prints MISSED. Exits 0 unless ``--strict`` and a target or a check fails.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import secrets
import sys
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _common as c  # noqa: E402
from bench import _wrk  # noqa: E402

BATCH = 100
TARGET_SHARE_OF_OPENBAO = 0.25
TARGET_P99_MS = 50.0
TARGET_BATCH_DEKS = 20_000
GUNICORN = Path(c.PYTHON).parent / "gunicorn"
GUNICORN_CONF = c.ROOT / "deploy" / "gunicorn.conf.py"
CONTEXT = {"service": "bench"}
ACCESS_LINE = re.compile(r'"POST (/api/v1/data-keys/(?:\d+/)?unwrap)" (\d{3}) ')


def _post(url: str, body: dict, headers: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **headers})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


# -- Keyvault ---------------------------------------------------------------------------------


def prepare_instance(env: dict) -> str:
    """Migrate, create the KEK and the client; returns the client's token."""
    c.log("migrating")
    c.manage(env, "migrate", "-v0")
    c.manage(env, "kms", "create-key", "bench-kek")
    _, token = c.manage(env, "api", "client", "create", "bench", "--kek", "bench-kek", "--ops", "unwrap,generate",
                        "--context-require", "service=bench", "--rate-limit", "1000000")
    return token.strip().splitlines()[-1]


def start_gunicorn(env: dict, data_dir: Path, name: str, args) -> tuple[c.Process, str]:
    port = c.free_port()
    env = {**env, "HMD_SECURE_SSL_REDIRECT": "false", "HMD_BIND": f"127.0.0.1:{port}",
           "HMD_WEB_WORKERS": str(args.workers), "HMD_WEB_THREADS": str(args.threads),
           "HMD_WEB_MAX_REQUESTS": "0"}  # no recycling mid-measurement
    command = [str(GUNICORN), "-c", str(GUNICORN_CONF)]
    if args.worker_class != "gthread":
        command += ["--worker-class", args.worker_class]
    server = c.Process(command, env, data_dir / f"gunicorn-{name}.log")
    base = f"http://127.0.0.1:{port}"

    def up():
        if not server.alive():
            raise RuntimeError(f"gunicorn exited:\n{server.tail()}")
        try:
            with urllib.request.urlopen(base + "/healthz", timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    c.wait_for(up, timeout=120, what="gunicorn")
    return server, base


def create_data_keys(base: str, token: str, count: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < count:
        size = min(1000, count - len(ids))
        answer = _post(f"{base}/api/v1/keks/bench-kek/data-keys",
                       {"batch": [{"context": CONTEXT, "purpose": "bench"} for _ in range(size)]},
                       {"Authorization": f"Bearer {token}"})
        ids += [item["id"] for item in answer["batch"]]
    return ids


def keyvault_scripts(folder: Path, token: str, ids: list[int]) -> dict[str, Path]:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    body = json.dumps({"context": CONTEXT})
    single = [(f"/api/v1/data-keys/{i}/unwrap", body) for i in ids]
    batches = [("/api/v1/data-keys/unwrap",
                json.dumps({"batch": [{"id": i, "context": CONTEXT} for i in ids[start:start + BATCH]]}))
               for start in range(0, len(ids) - BATCH + 1, BATCH)]
    return {"single": _wrk.write_script(folder, "kv-single", headers, single),
            "batch": _wrk.write_script(folder, "kv-batch", headers, batches)}


def check_batch_answer(base: str, token: str, ids: list[int]) -> None:
    """One batch call before measuring: every item must come back with a plaintext."""
    answer = _post(f"{base}/api/v1/data-keys/unwrap", {"batch": [{"id": i, "context": CONTEXT} for i in ids[:BATCH]]},
                   {"Authorization": f"Bearer {token}"})
    bad = [item for item in answer["batch"] if "plaintext" not in item]
    if bad:
        raise RuntimeError(f"batch unwrap answered errors: {bad[:3]}")


def answered_unwraps(log_path: Path) -> tuple[int, int, int]:
    """(single 200s, batch 200s, other answers) from a gunicorn access log."""
    single = batch = other = 0
    for line in log_path.read_text(errors="replace").splitlines():
        match = ACCESS_LINE.search(line)
        if not match:
            continue
        if match.group(2) != "200":
            other += 1
        elif match.group(1) == "/api/v1/data-keys/unwrap":
            batch += 1
        else:
            single += 1
    return single, batch, other


# -- OpenBao ----------------------------------------------------------------------------------


def start_openbao(stack: ExitStack, folder: Path) -> tuple[str, Path]:
    """OpenBao dev with a file audit device and Transit key ``bench``; returns (url, wrk script)."""
    from tests.servers.openbao import running_openbao

    server = stack.enter_context(running_openbao(audit_log=True))
    server.enable_secrets_engine("transit", "transit")
    server.request("POST", "transit/keys/bench", {"type": "aes256-gcm96"})
    headers = {"X-Vault-Token": server.root_token, "Content-Type": "application/json"}
    ciphertexts = []
    for _ in range(64):
        plaintext = base64.b64encode(secrets.token_bytes(32)).decode()
        answer = server.request("POST", "transit/encrypt/bench", {"plaintext": plaintext})
        ciphertexts.append(answer["data"]["ciphertext"])
    requests = [("/v1/transit/decrypt/bench", json.dumps({"ciphertext": ct})) for ct in ciphertexts]
    return server.addr, _wrk.write_script(folder, "openbao", headers, requests)


# -- the run ----------------------------------------------------------------------------------


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="length of one measurement")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--group-commit", default="off,on",
                        help="audit modes to run, each its own gunicorn: off, on or off,on")
    parser.add_argument("--worker-class", default="gthread", help="gunicorn worker class (deploy/ uses gthread)")
    parser.add_argument("--workers", type=int, default=min(2 * (os.cpu_count() or 1) + 1, 8))
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--data-keys", type=int, default=1000)
    parser.add_argument("--cache-url", default="redis://127.0.0.1:6379/15",
                        help="the shared cache the rate limit counts in (HMD_CACHE_URL)")
    parser.add_argument("--db", default="kv_bench_api", help="private database (dropped and created)")
    parser.add_argument("--data-dir")
    parser.add_argument("--keep", action="store_true", help="keep the database and data folder")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a target or check fails")
    return parser.parse_args()


def settle(db_name: str, quiet: float = 1.0, timeout: float = 600) -> None:
    """Wait until the servers' database sessions have been idle for ``quiet`` seconds.

    Calls wrk gave up on at its end (queued in the servers) finish first, so one measurement's
    leftovers neither load the next nor hold the chain head during it.
    """
    from django.db import connection

    def busy() -> int:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND state <> 'idle' "
                           "AND pid <> pg_backend_pid()", [db_name])
            return cursor.fetchone()[0]

    since, deadline = time.monotonic(), time.monotonic() + timeout
    while time.monotonic() - since < quiet and time.monotonic() < deadline:
        time.sleep(0.2)
        if busy():
            since = time.monotonic()


def measure(args, targets: dict) -> dict[str, list[_wrk.Result]]:
    """Interleaved rounds over ``targets`` (label -> (url, script)); every result kept."""
    results: dict[str, list[_wrk.Result]] = {label: [] for label in targets}
    labels = list(targets)
    for number in range(args.rounds):
        shift = number % len(labels)
        for label in labels[shift:] + labels[:shift]:
            url, script = targets[label]
            results[label].append(_wrk.run(url, script, seconds=args.seconds, connections=args.connections))
            settle(args.db)
        c.log(f"round {number + 1}/{args.rounds}: " + ", ".join(
            f"{label} {results[label][-1].per_second:,.0f}/s p99 {results[label][-1].p99_ms:.0f} ms" for label in labels))
    return results


def report(args, results, modes) -> bool:
    def med(label, field):
        return c.median(getattr(r, field) if field != "per_second" else r.per_second for r in results[label])

    print()
    print(f"Application API on PostgreSQL against OpenBao Transit, wrk -c{args.connections} -t2, "
          f"{args.seconds:g} s each, median of {args.rounds} interleaved rounds ({os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}); gunicorn {args.worker_class} {args.workers} workers"
          + (f" x {args.threads} threads" if args.worker_class == "gthread" else ""))
    rows = []
    for label in results:
        deks = BATCH if label.endswith("batch") else 1
        rows.append([label, f"{med(label, 'per_second'):,.0f}", f"{med(label, 'per_second') * deks:,.0f}",
                     f"{med(label, 'p50_ms'):.1f}", f"{med(label, 'p99_ms'):.1f}",
                     sum(r.errors for r in results[label])])
    c.print_table(["what", "requests/s", "DEKs/s", "p50 ms", "p99 ms", "errors"], rows)
    print()
    bao = med("openbao decrypt", "per_second")
    ok = True
    for mode in modes:
        single, batch = f"keyvault[{mode}] single", f"keyvault[{mode}] batch"
        share = med(single, "per_second") / bao
        checks = [
            (f"single unwrap >= {TARGET_SHARE_OF_OPENBAO:.0%} of OpenBao's requests/s", share >= TARGET_SHARE_OF_OPENBAO,
             f"{share:.0%}"),
            (f"single unwrap p99 <= {TARGET_P99_MS:g} ms", med(single, "p99_ms") <= TARGET_P99_MS,
             f"{med(single, 'p99_ms'):.1f} ms"),
            (f"batch unwrap p99 <= {TARGET_P99_MS:g} ms", med(batch, "p99_ms") <= TARGET_P99_MS,
             f"{med(batch, 'p99_ms'):.1f} ms"),
            (f"batch unwrap >= {TARGET_BATCH_DEKS:,} DEKs/s", med(batch, "per_second") * BATCH >= TARGET_BATCH_DEKS,
             f"{med(batch, 'per_second') * BATCH:,.0f}"),
        ]
        for text, met, figure in checks:
            print(f"[group commit {mode}] target {text}: {figure} -> {'met' if met else 'MISSED'}")
            ok &= met
    return ok


def verify_chain(env: dict, logs: dict[str, Path]) -> bool:
    from keyvault.models import AuditEvent, AuditPendingEvent

    single = batch = other = 0
    for path in logs.values():
        s, b, o = answered_unwraps(path)
        single, batch, other = single + s, batch + b, other + o
    expected = single + BATCH * batch
    events = AuditEvent.objects.filter(action=AuditEvent.Action.DATA_KEY_UNWRAPPED, actor="api:bench").count()
    pending = AuditPendingEvent.objects.count()
    one_each = events == expected and pending == 0
    print(f"unwraps answered 200: {single:,} single + {batch:,} batch x {BATCH} = {expected:,}; other answers "
          f"{other:,}; unwrap events in the chain {events:,}; left in the outbox {pending}: "
          f"{'one event per unwrap' if one_each else 'MISMATCH'}")
    _, verified = c.manage(env, "audit", "verify", timeout=3600)
    last = verified.splitlines()[-1] if verified else "(no output)"
    print(f"manage.py audit verify: {last}")
    return one_each and last.startswith("OK")


def main() -> int:
    args = parse_args()
    if not _wrk.available():
        print("wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    modes = [m.strip() for m in args.group_commit.split(",") if m.strip()]
    data_dir, own_dir = c.make_data_dir(args.data_dir, "kv-bench-api-")
    c.create_database(args.db)
    env = c.instance_env(data_dir, args.db, HMD_CACHE_URL=args.cache_url)
    ok = True
    try:
        token = prepare_instance(env)
        c.setup_django(env)
        with ExitStack() as stack:
            targets, logs, ids = {}, {}, None
            for mode in modes:
                server, base = start_gunicorn({**env, "HMD_AUDIT_GROUP_COMMIT": "true" if mode == "on" else "false"},
                                              data_dir, mode, args)
                stack.callback(server.stop)
                logs[mode] = server.log_path
                if ids is None:
                    c.log(f"creating {args.data_keys} data keys")
                    ids = create_data_keys(base, token, args.data_keys)
                    scripts = keyvault_scripts(data_dir, token, ids)
                check_batch_answer(base, token, ids)
                targets[f"keyvault[{mode}] single"] = (base, scripts["single"])
                targets[f"keyvault[{mode}] batch"] = (base, scripts["batch"])
            bao_url, bao_script = start_openbao(stack, data_dir)
            targets["openbao decrypt"] = (bao_url, bao_script)
            results = measure(args, targets)
        ok &= report(args, results, modes)
        ok &= verify_chain(env, logs)
    finally:
        if args.keep:
            print(f"kept database {args.db} and {data_dir}")
        else:
            c.discard_instance(args.db, data_dir, own_dir)
    return 1 if args.strict and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
