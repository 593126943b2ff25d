"""Exit 0 when the server behind a URL answers: ``reachable.py postgres|redis URL``."""

import sys


def main(kind: str, url: str) -> int:
    try:
        if kind == "postgres":
            import psycopg

            with psycopg.connect(url.replace("/keyvault", "/postgres"), connect_timeout=3) as conn:
                conn.execute("select 1")
        elif kind == "amqp":
            from kombu import Connection

            with Connection(url, connect_timeout=3) as conn:
                conn.ensure_connection(max_retries=1)
        elif kind == "redis":
            import redis

            redis.Redis.from_url(url, socket_connect_timeout=3).ping()
        else:
            raise SystemExit(f"unknown kind {kind}")
    except Exception as exc:  # any failure means "not reachable", reported below
        print(f"{kind} at {url} not reachable: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
