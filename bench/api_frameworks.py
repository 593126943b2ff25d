#!/usr/bin/env python
"""Django Ninja against Django REST Framework: per-request overhead of the same endpoint (issue 17).

    .venv/bin/pip install -r bench/requirements.txt     # djangorestframework, drf-spectacular
    .venv/bin/python bench/api_frameworks.py [--seconds 10] [--connections 64] [--rounds 3]

The endpoint (``bench/api_frameworks_app.py``), three ways: a bearer token, a small JSON
body validated (pydantic schema / DRF serializer / by hand), a JSON answer; no database,
no middleware. ``plain`` (Django alone) is the floor. Two measurements, rounds interleaved,
the order rotating, medians:

* **HTTP**: gunicorn (gthread, the worker and thread counts of ``deploy/gunicorn.conf.py``)
  driven by ``wrk`` (``--connections`` keep-alive connections): requests/s, p50, p99; the
  per-request overhead over the floor is ``1/rate - 1/rate(plain)`` (server capacity time).
* **in process**: the WSGI handler called directly, ``--calls`` requests a batch: µs per
  request of one core, and the same difference to the floor.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _common as c  # noqa: E402
from bench import _wrk  # noqa: E402

FRAMEWORKS = ("plain", "ninja", "drf")
PATHS = {"plain": "/plain/items", "ninja": "/ninja/items", "drf": "/drf/items"}
BODY = json.dumps({"name": "billing-reader", "count": 42, "context": {"service": "billing", "tenant": "acme"}})
GUNICORN = Path(c.PYTHON).parent / "gunicorn"


def start_server(args, folder: Path) -> tuple[c.Process, str]:
    port = c.free_port()
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "bench.api_frameworks_app", "PYTHONUNBUFFERED": "1"}
    server = c.Process([str(GUNICORN), "bench.api_frameworks_app:wsgi()", "-k", "gthread", "-w", str(args.workers),
                        "--threads", str(args.threads), "-b", f"127.0.0.1:{port}", "--keep-alive", "5"],
                       env, folder / "gunicorn.log")
    base = f"http://127.0.0.1:{port}"

    def up():
        if not server.alive():
            raise RuntimeError(f"gunicorn exited:\n{server.tail()}")
        try:
            request = urllib.request.Request(base + PATHS["plain"], data=BODY.encode(), method="POST", headers={
                "Authorization": f"Bearer {_token()}", "Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    c.wait_for(up, timeout=60, what="gunicorn")
    return server, base


def _token() -> str:
    from bench.api_frameworks_app import TOKEN

    return TOKEN


def in_process(calls: int) -> dict[str, float]:
    """µs per request through the WSGI handler, one batch of ``calls`` per framework."""
    from bench.api_frameworks_app import wsgi

    handler = wsgi()
    body = BODY.encode()
    figures = {}

    def call(name: str) -> None:
        environ = {"REQUEST_METHOD": "POST", "PATH_INFO": PATHS[name], "SERVER_NAME": "127.0.0.1",
                   "SERVER_PORT": "80", "HTTP_HOST": "127.0.0.1", "wsgi.url_scheme": "http",
                   "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": str(len(body)),
                   "HTTP_AUTHORIZATION": f"Bearer {_token()}", "wsgi.input": io.BytesIO(body),
                   "wsgi.errors": sys.stderr}
        statuses = []
        b"".join(handler(environ, lambda status, headers: statuses.append(status)))
        if not statuses[0].startswith("200"):
            raise RuntimeError(f"{name} answered {statuses[0]}")

    for name in FRAMEWORKS:
        call(name)
        started = time.perf_counter()
        for _ in range(calls):
            call(name)
        figures[name] = (time.perf_counter() - started) / calls * 1e6
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=min(2 * (os.cpu_count() or 1) + 1, 8))
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--calls", type=int, default=3000, help="requests per in-process batch")
    args = parser.parse_args()
    if not _wrk.available():
        print("wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    os.environ["DJANGO_SETTINGS_MODULE"] = "bench.api_frameworks_app"
    import django

    django.setup()
    import ninja
    import rest_framework

    folder, _ = c.make_data_dir(None, "kv-bench-frameworks-")
    headers = {"Authorization": f"Bearer {_token()}", "Content-Type": "application/json"}
    scripts = {name: _wrk.write_script(folder, name, headers, [(PATHS[name], BODY)]) for name in FRAMEWORKS}
    http: dict[str, list[_wrk.Result]] = {name: [] for name in FRAMEWORKS}
    local: dict[str, list[float]] = {name: [] for name in FRAMEWORKS}
    server, base = start_server(args, folder)
    try:
        for number in range(args.rounds):
            shift = number % len(FRAMEWORKS)
            for name in FRAMEWORKS[shift:] + FRAMEWORKS[:shift]:
                http[name].append(_wrk.run(base, scripts[name], seconds=args.seconds, connections=args.connections))
            for name, micros in in_process(args.calls).items():
                local[name].append(micros)
            c.log(f"round {number + 1}/{args.rounds}: " + ", ".join(
                f"{name} {http[name][-1].per_second:,.0f}/s, {local[name][-1]:.0f} µs in process" for name in FRAMEWORKS))
    finally:
        server.stop()
        c.remove_dir(folder)

    print()
    print(f"One authenticated JSON endpoint, Django alone / Django Ninja {ninja.__version__} / DRF "
          f"{rest_framework.VERSION}; median of {args.rounds} interleaved rounds ({os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}); HTTP: gunicorn gthread {args.workers}x{args.threads}, wrk -c{args.connections} "
          f"{args.seconds:g} s; in process: {args.calls} WSGI calls")
    rate = {name: c.median(r.per_second for r in http[name]) for name in FRAMEWORKS}
    micros = {name: c.median(local[name]) for name in FRAMEWORKS}
    rows = []
    for name in FRAMEWORKS:
        rows.append([name, f"{rate[name]:,.0f}", f"{c.median(r.p50_ms for r in http[name]):.1f}",
                     f"{c.median(r.p99_ms for r in http[name]):.1f}", sum(r.errors for r in http[name]),
                     f"{(1 / rate[name] - 1 / rate['plain']) * 1e6:+.0f}", f"{micros[name]:.0f}",
                     f"{micros[name] - micros['plain']:+.0f}"])
    c.print_table(["framework", "requests/s", "p50 ms", "p99 ms", "errors", "HTTP overhead µs/req",
                   "in-process µs/req", "overhead µs/req"], rows)
    lighter = min(("ninja", "drf"), key=lambda name: micros[name])
    print(f"\nlower per-request overhead (in process): {lighter} "
          f"({micros['ninja'] - micros['plain']:.0f} µs ninja, {micros['drf'] - micros['plain']:.0f} µs drf over Django alone)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
