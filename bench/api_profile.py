#!/usr/bin/env python
"""Where an API unwrap spends its time: cProfile of single and batch unwraps in one process (issue 17).

    .venv/bin/python bench/api_profile.py [--calls 300] [--batches 5] [--group-commit] [--top 45] [--sort tottime]

A private PostgreSQL database (created and dropped) with the instance ``bench/api.py`` builds:
a local KEK, the ``bench`` client, 200 data keys. The calls go through Django's test client
(the API handler's middleware, Ninja, the services, the key services and the audit chain), first
timed, then profiled; the profiles print sorted by cumulative time.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _common as c  # noqa: E402
from bench.api import CONTEXT, prepare_instance  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--group-commit", action="store_true", help="HMD_AUDIT_GROUP_COMMIT=true")
    parser.add_argument("--top", type=int, default=45)
    parser.add_argument("--sort", default="cumulative", help="pstats sort key: cumulative or tottime")
    parser.add_argument("--only", help="print only functions whose path matches this pattern (e.g. keyvault)")
    parser.add_argument("--db", default="kv_bench_api_profile")
    parser.add_argument("--cache-url", default="redis://127.0.0.1:6379/15")
    args = parser.parse_args()
    data_dir, own_dir = c.make_data_dir(None, "kv-bench-api-profile-")
    c.create_database(args.db)
    env = c.instance_env(data_dir, args.db, HMD_CACHE_URL=args.cache_url, HMD_SECURE_SSL_REDIRECT="false",
                         HMD_AUDIT_GROUP_COMMIT="true" if args.group_commit else "false")
    try:
        token = prepare_instance(env)
        c.setup_django(env)
        from django.test import Client

        from django.test.utils import override_settings

        from keyvault.api.handler import API_MIDDLEWARE

        client = Client(HTTP_HOST="127.0.0.1", HTTP_AUTHORIZATION=f"Bearer {token}")
        with override_settings(MIDDLEWARE=list(API_MIDDLEWARE)):  # as the served application's API handler
            client.handler.load_middleware()
        made = client.post("/api/v1/keks/bench-kek/data-keys", json.dumps({"batch": [{"context": CONTEXT}] * 200}),
                           content_type="application/json")
        ids = [item["id"] for item in made.json()["batch"]]
        single_body = json.dumps({"context": CONTEXT})
        batch_body = json.dumps({"batch": [{"id": i, "context": CONTEXT} for i in ids[:100]]})

        def single(count: int) -> None:
            for n in range(count):
                answer = client.post(f"/api/v1/data-keys/{ids[n % len(ids)]}/unwrap", single_body,
                                     content_type="application/json")
                assert answer.status_code == 200, answer.content

        def batch(count: int) -> None:
            for _ in range(count):
                answer = client.post("/api/v1/data-keys/unwrap", batch_body, content_type="application/json")
                assert answer.status_code == 200, answer.content

        for name, run, count in (("single", single, args.calls), ("batch", batch, args.batches)):
            run(max(1, count // 10))  # warm up
            started, cpu = time.perf_counter(), time.process_time()
            run(count)
            print(f"{name}: {(time.perf_counter() - started) / count * 1000:.2f} ms per call, "
                  f"{(time.process_time() - cpu) / count * 1000:.2f} ms of this process's CPU")
            profile = cProfile.Profile()
            profile.runcall(run, count)
            pstats.Stats(profile).sort_stats(args.sort).print_stats(*([args.only] if args.only else []), args.top)
    finally:
        c.discard_instance(args.db, data_dir, own_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
