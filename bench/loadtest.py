"""Headless load test: N console users browse for T seconds while rotations run.

Production-like: HMD_DEBUG=false (two-factor login required, manifest static files
served by WhiteNoise) behind gunicorn with ``deploy/gunicorn.conf.py`` on
127.0.0.1 only. Plain HTTP on loopback, so the secure-only cookie and HTTPS
redirect settings are turned off for this run (HMD_SECURE_COOKIES=false,
HMD_SECURE_SSL_REDIRECT=false); everything else is as deployed.

Each virtual user is a staff user with a real TOTP device: it signs in with its
password, then with a code from django-otp's ``totp``, then requests console
changelists and report pages in a loop. Meanwhile this process rotates the
KEK again and again (``rotation.services.start_run`` + ``drive``), rewrapping
its data keys. Any answer other than 200, or any exception, counts as an error.

    python bench/loadtest.py --users 50 --duration 60 \
        --database-url postgres://postgres@127.0.0.1:5432/kv_load

Exit status 1 if there was any error. Bounded: at most --users connections,
stops after --duration seconds (plus login and shutdown).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import random
import re
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "load test password 0123"
LOGIN_CONCURRENCY = 4
PER_URL: dict[str, list[float]] = {}
CSRF = re.compile(r'name="csrfmiddlewaretoken" value="([^"]+)"')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--database-url", default="", help="default: SQLite in a temporary directory")
    parser.add_argument("--data-keys", type=int, default=2000, help="data keys each rotation rewraps")
    parser.add_argument("--web-workers", type=int, default=4)
    args = parser.parse_args(argv)
    if not (1 <= args.users <= 200) or not (1 <= args.duration <= 600):
        parser.error("--users must be 1..200 and --duration 1..600 seconds")
    return args


def production_env(data_dir: Path, database_url: str) -> dict[str, str]:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    signing = Ed25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    env = {
        "DJANGO_SETTINGS_MODULE": "keyvault.settings",
        "HMD_DEBUG": "false",
        "HMD_DATA_DIR": str(data_dir),
        "HMD_SECRET_KEY": secrets.token_urlsafe(50),
        "HMD_AUDIT_HMAC_KEY": secrets.token_urlsafe(50),
        "HMD_AUDIT_SIGNING_KEY": base64.b64encode(signing).decode(),
        "HMD_LOCAL_KMS_MASTER_KEY": base64.b64encode(secrets.token_bytes(32)).decode(),
        "HMD_ALLOWED_HOSTS": "127.0.0.1",
        "HMD_SECURE_COOKIES": "false",  # plain HTTP on loopback only
        "HMD_SECURE_SSL_REDIRECT": "false",
        "HMD_LOG_LEVEL": "WARNING",
    }
    if database_url:
        env["HMD_DATABASE_URL"] = database_url
    else:
        env["HMD_ALLOW_SQLITE_IN_PRODUCTION"] = "true"  # the smoke run's scratch SQLite file, on purpose
    return env


def setup_world(users: int, data_keys: int) -> tuple[list[tuple[str, bytes]], int]:
    """Migrate, collect static files, make users with TOTP devices and a KEK with data keys."""
    import django

    django.setup()
    from django.contrib.auth.models import Group, User
    from django.core.management import call_command
    from keyvault.keys import services
    from keyvault.audit import Actor
    from keyvault.kms import get_provider
    from keyvault.models import DataKey, TOTPDevice
    from keyvault.access.roles import AUDITORS, KEY_ADMINISTRATORS, KEY_OPERATORS

    call_command("migrate", verbosity=0)
    call_command("collectstatic", interactive=False, verbosity=0)
    groups = [Group.objects.get(name=name) for name in (AUDITORS, KEY_OPERATORS, KEY_ADMINISTRATORS)]
    accounts = []
    for i in range(users):
        user = User.objects.create_user(f"load{i:03d}", password=PASSWORD, is_staff=True)
        user.groups.add(groups[i % len(groups)])
        device = TOTPDevice.objects.create(user=user, name="console", confirmed=True)
        accounts.append((user.username, device.bin_key))
    actor = Actor.system("loadtest")
    kek = services.create_kek(name="load", actor=actor)
    # Back-to-back rotations: no approvals and no grace period before old versions retire.
    from datetime import timedelta

    from rotation import services as rotation

    rotation.update_policy(kek, actor=actor, approvals_required=0, grace_period=timedelta(0))
    provider = get_provider(kek.provider)
    rows = []
    for i in range(data_keys):
        dek = provider.generate_data_key(kek.provider_key_id, encryption_context={"tenant": f"t{i % 9}"})
        rows.append(DataKey(kek=kek, kek_version=dek.key_version, wrapped_key=dek.ciphertext,
                            encryption_context={"tenant": f"t{i % 9}"}, owner_ref=f"load.{i}"))
        dek.wipe()
    DataKey.objects.bulk_create(rows, batch_size=2000)
    return accounts, kek.pk


def console_urls() -> list[str]:
    urls = ["/", "/keyvault/keyencryptionkey/", "/keyvault/datakey/", "/keyvault/auditevent/"]
    from django.urls import NoReverseMatch, reverse

    for name in ("admin:rotation_rotationrun_changelist", "admin:rotation_rotationpolicy_changelist",
                 "reports:index"):
        try:
            urls.append(reverse(name))
        except NoReverseMatch:
            pass
    try:
        from keyvault.console import reports

        urls += [reverse("reports:report", args=[name]) for name in list(reports.REPORTS)[:4]]
    except (ImportError, NoReverseMatch, AttributeError):
        pass
    return urls


def rotate_until(stop: threading.Event, kek_id: int, done: list) -> None:
    """Rotate the KEK back to back (each run rewraps every data key) until told to stop."""
    from django.db import connection

    from keyvault.audit import Actor
    from keyvault.models import KeyEncryptionKey
    from rotation import services as rotation

    try:
        while not stop.is_set():
            kek = KeyEncryptionKey.objects.get(pk=kek_id)
            with rotation.inline_dispatch():
                run = rotation.start_run(kek=kek, actor=Actor.system("loadtest"), reason="load test")
            done.append(rotation.drive(run.pk).state)
    except Exception as exc:  # reported as an error of the run
        done.append(f"error: {type(exc).__name__}: {exc}")
    finally:
        connection.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def sign_in(client, username: str, key: bytes, gate: asyncio.Semaphore, errors: list[str]) -> bool:
    """Password, then TOTP code. A few at a time: each login hashes a password (PBKDF2, on purpose slow)."""
    from django_otp.oath import totp

    step = "start"
    async with gate:
        try:
            step = "login page"
            page = await client.get("/login/")
            token = CSRF.search(page.text).group(1)
            signed_in = await client.post("/login/", data={"username": username, "password": PASSWORD,
                                                           "csrfmiddlewaretoken": token, "next": "/"})
            if signed_in.status_code != 302:
                raise RuntimeError(f"password login answered {signed_in.status_code}")
            step = "token page"
            page = await client.get("/otp/verify/?next=/")
            token = CSRF.search(page.text).group(1)
            verified = await client.post("/otp/verify/", data={"token": f"{totp(key):06d}", "next": "/",
                                                               "csrfmiddlewaretoken": token})
            if verified.status_code != 302 or verified.headers["location"] != "/":
                raise RuntimeError(f"token answered {verified.status_code}")
        except Exception as exc:
            errors.append(f"{username} login ({step}): {type(exc).__name__}: {exc}")
            return False
        return True


async def browse_until(client, urls: list[str], deadline: float, latencies: list[float], errors: list[str]) -> None:
    while time.monotonic() < deadline:
        url = random.choice(urls)
        started = time.perf_counter()
        try:
            response = await client.get(url)
            latencies.append(time.perf_counter() - started)
            PER_URL.setdefault(url, []).append(latencies[-1])
            if response.status_code != 200:
                errors.append(f"{url}: {response.status_code}")
        except Exception as exc:
            errors.append(f"{url}: {type(exc).__name__}")


async def browse(base_url: str, accounts, urls, duration: float) -> tuple[list[float], list[str], float]:
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    clients = [httpx.AsyncClient(base_url=base_url, timeout=30.0, limits=limits) for _ in accounts]
    gate = asyncio.Semaphore(LOGIN_CONCURRENCY)
    try:
        signed_in = await asyncio.gather(*(sign_in(client, name, key, gate, errors)
                                           for client, (name, key) in zip(clients, accounts)))
        deadline = time.monotonic() + duration  # the measured window starts when everyone is in
        window_start = time.monotonic()
        await asyncio.gather(*(browse_until(client, urls, deadline, latencies, errors)
                               for client, ok in zip(clients, signed_in) if ok))
        window = time.monotonic() - window_start
    finally:
        await asyncio.gather(*(client.aclose() for client in clients))
    return latencies, errors, window


def wait_healthy(base_url: str, process, timeout: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {process.returncode}")
        try:
            if httpx.get(f"{base_url}/healthz", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError("gunicorn did not become healthy in time")


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory(prefix="keyvault-load-") as tmp:
        env = production_env(Path(tmp), args.database_url)
        os.environ.update(env)
        if args.database_url.startswith("postgres"):
            _recreate_postgres_database(args.database_url)
        accounts, kek_id = setup_world(args.users, args.data_keys)
        urls = console_urls()
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        gunicorn = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "deploy/gunicorn.conf.py"),
             "--bind", f"127.0.0.1:{port}", "--workers", str(args.web_workers), "--access-logfile", "/dev/null"],
            cwd=ROOT, env={**os.environ, **env},
        )
        stop = threading.Event()
        rotations: list[str] = []
        rotator = threading.Thread(target=rotate_until, args=(stop, kek_id, rotations), daemon=True)
        try:
            wait_healthy(base_url, gunicorn)
            rotator.start()
            latencies, errors, elapsed = asyncio.run(browse(base_url, accounts, urls, args.duration))
        finally:
            stop.set()
            rotator.join(timeout=120)
            gunicorn.send_signal(signal.SIGTERM)
            try:
                gunicorn.wait(timeout=30)
            except subprocess.TimeoutExpired:
                gunicorn.kill()
        errors += [state for state in rotations if state.startswith("error")]
        print(f"users={args.users} duration={elapsed:.1f}s requests={len(latencies)} "
              f"rps={len(latencies) / elapsed:.1f} errors={len(errors)} rotations={len(rotations)} "
              f"({', '.join(sorted(set(rotations))) or 'none'})")
        if latencies:
            print(f"latency p50={percentile(latencies, 50) * 1000:.0f}ms p95={percentile(latencies, 95) * 1000:.0f}ms "
                  f"max={max(latencies) * 1000:.0f}ms")
        for url, values in sorted(PER_URL.items(), key=lambda item: -statistics.median(item[1])):
            print(f"  {url}: n={len(values)} p50={statistics.median(values) * 1000:.0f}ms "
                  f"max={max(values) * 1000:.0f}ms")
        for error in errors[:20]:
            print(f"error: {error}")
        if args.database_url.startswith("postgres"):
            from django.db import connections

            connections.close_all()
        return 1 if errors or not latencies or not rotations else 0


def _recreate_postgres_database(url: str) -> None:
    """Start from an empty database (the URL names a scratch database, never a shared one)."""
    from urllib.parse import urlparse

    import psycopg

    parsed = urlparse(url)
    name = parsed.path.lstrip("/")
    if not re.fullmatch(r"[a-z0-9_]+", name) or not (name.startswith("kv_") or "load" in name):
        raise SystemExit(f"refusing to recreate database {name!r}: use a scratch name like kv_load")
    admin_url = parsed._replace(path="/postgres").geturl()
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


if __name__ == "__main__":
    sys.exit(main())
