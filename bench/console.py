#!/usr/bin/env python
"""Console response times on a big inventory, and a full audit-chain verification (Keyvault issue 3).

    .venv/bin/python bench/console.py [--n 1000000] [--audit-n N] [--requests 20] [--keep]

1. Creates a fresh PostgreSQL database (default ``kv_bench_console``) and runs
   ``manage.py migrate`` against it with production-like settings (``HMD_DEBUG=false``,
   secrets generated for the run, a private data folder holding the local keyring).
2. Creates the KEKs through ``keyvault.keys.services.create_kek`` (so they exist at the local
   provider; the extra ones with their rotation policies, through
   ``rotation.services.create_kek_with_policy``), rotates some of them to get several versions,
   disables a few.
3. Seeds ``--n`` data keys and ``--audit-n`` (default ``--n``) audit events with
   PostgreSQL ``COPY`` (psycopg 3 ``cursor.copy``), not the ORM:

   * audit events continue the chain the services started: ``sequence``, ``prev_hash`` and
     ``hash`` are computed with ``keyvault.audit.canonical_bytes`` exactly as ``audit.record``
     does; a signed checkpoint is written every ``AUDIT_CHECKPOINT_INTERVAL`` events (chained
     as ``audit`` chains them) and ``AuditChainHead`` is set to the new tip, so
     ``manage.py audit verify`` must report the chain intact;
   * data keys are spread over four KEKs and their versions. ``wrapped_key`` has the local
     provider's real layout and size (header naming the KEK and version, 12-byte nonce,
     32-byte key, 16-byte tag) but random bytes after the header: wrapping a million real
     DEKs is what ``bench/rewrap.py`` measures; the console only displays and counts them.

   Then ``VACUUM ANALYZE`` (what autovacuum would do shortly after a bulk load).
4. Starts the production web process (gunicorn with ``deploy/gunicorn.conf.py``; ``--server
   runserver`` for ``manage.py runserver --noreload``) on 127.0.0.1 with ``HMD_DEBUG=false``, logs in
   as a member of "Key administrators" (CSRF login with ``requests.Session``) and times each
   page: one untimed warm-up request (reported as "first"), then ``--requests`` timed ones
   (median, p95). Target: median < 300 ms for every page.
5. Times ``manage.py audit verify`` over the whole chain (target: < 10 s for 1M events), then
   ``audit.verify_chain()`` in this process with the default number of connections and with
   one, against a baseline measured in the same run: SHA-256 chaining of as many event-sized
   documents with no reading at all.

Everything is removed at the end (database, data folder, server) unless ``--keep``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _common as c  # noqa: E402

PAGE_TARGET_MS = 300.0
VERIFY_TARGET_S_PER_MILLION = 10.0
COPY_CHUNK = 20_000

#: The KEKs data keys are spread over: (name, versions, share of the data keys).
DATA_KEKS = (("payments", 3, 0.4), ("customers", 2, 0.3), ("analytics", 1, 0.2), ("backups", 4, 0.1))
PEOPLE = [f"user:{name}" for name in (
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory", "niaj",
    "olivia", "peggy", "rupert", "sybil", "trent", "victor", "walter", "zoe")]
SERVICES = [f"user:svc-{name}" for name in ("payments", "billing", "crm", "etl", "backup", "search")]
SYSTEM = ["system:rotation-engine", "system:beat", "system:bootstrap"]
IPS = [f"10.0.{i // 250}.{i % 250 + 1}" for i in range(500)]


# -- setup -------------------------------------------------------------------------------


def create_inventory(extra_keks: int) -> tuple[dict[str, object], list]:
    """KEKs through the services: the four that hold data keys (rotated to their versions) plus extras."""
    from keyvault.keys import services
    from keyvault.audit import Actor
    from rotation import services as rotation_services

    actor = Actor.system("bench")
    keks = {}
    for name, versions, _ in DATA_KEKS:
        kek = services.create_kek(name=name, actor=actor, description=f"bench: {name} data keys")
        for _ in range(versions - 1):
            services.rotate_kek_version(kek, actor=actor, reason="bench")
        keks[name] = kek
    extras = []
    for i in range(extra_keks):
        kek = rotation_services.create_kek_with_policy(name=f"team-{i:03d}", actor=actor,
                                                       description="bench: no data keys", period=timedelta(days=30 + i))
        if i % 7 == 3:
            services.disable_kek(kek, actor=actor, reason="bench")
        extras.append(kek)
    return keks, extras


def create_admin() -> tuple[str, str, object]:
    """A Key administrator; with two-factor login installed, also a confirmed TOTP device.

    Returns (username, password, a callable giving the current TOTP code or None).
    """
    from django.conf import settings
    from django.contrib.auth.models import Group, User

    from keyvault.access.roles import KEY_ADMINISTRATORS

    password = os.urandom(18).hex()
    user = User.objects.create_user("bench-admin", password=password, is_staff=True)
    user.groups.add(Group.objects.get(name=KEY_ADMINISTRATORS))
    token = None
    if "django_otp" in settings.INSTALLED_APPS:
        from django_otp.oath import totp

        from keyvault.models import TOTPDevice

        device = TOTPDevice.objects.create(user=user, name="console", confirmed=True)

        def token() -> str:
            code = totp(device.bin_key, step=device.step, t0=device.t0, digits=device.digits, drift=device.drift)
            return f"{code:0{device.digits}d}"

    return user.username, password, token


def _copy_text(value: str) -> str:
    """Escape a value for COPY's text format."""
    return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def seed_data_keys(conn, keks: dict, n: int, *, start: datetime, end: datetime) -> None:
    from keyvault.kms.local import HEADER
    from keyvault.models import wrapped_key_fingerprint

    rng = random.Random(3)
    names = [name for name, _, _ in DATA_KEKS]
    weights = [share for _, _, share in DATA_KEKS]
    versions = {name: count for name, count, _ in DATA_KEKS}
    headers = {
        (name, v): HEADER.pack(keks[name].provider_key_id, v).hex() for name in names
        for v in range(1, versions[name] + 1)
    }
    step = (end - start) / max(n, 1)
    columns = ("kek_id, kek_version, wrapped_key, fingerprint, key_spec, encryption_context, purpose, owner_ref, "
               "created_at")
    chosen = rng.choices(names, weights, k=n)
    with conn.cursor() as cur, cur.copy(f"COPY keyvault_datakey ({columns}) FROM STDIN") as copy:
        lines = []
        for i in range(n):
            name = chosen[i]
            top = versions[name]
            # Most keys sit on the primary version; older versions keep a tail (rotation in progress).
            version = top if top == 1 or rng.random() < 0.7 else rng.randint(1, top - 1)
            wrapped = headers[name, version] + os.urandom(12 + 32 + 16).hex()
            # As the key services store it with the wrapped key (DataKey.fingerprint).
            fingerprint = wrapped_key_fingerprint(bytes.fromhex(wrapped))
            created = (start + step * i).isoformat()
            lines.append(
                f"{keks[name].pk}\t{version}\t\\\\x{wrapped}\t{fingerprint}\tAES_256\t"
                f'{{"tenant": "t{i % 997:04d}"}}\tfield encryption\towner-{i % 10007:05d}\t{created}\n'
            )
            if len(lines) >= COPY_CHUNK:
                copy.write("".join(lines))
                lines.clear()
        if lines:
            copy.write("".join(lines))
    conn.commit()


def _event_shape(rng: random.Random, kek_names: list[str], n_data_keys: int):
    """(actor, action, target_type, target_id, outcome, ip, details) for one synthetic event."""
    roll = rng.random()
    kek = rng.choice(kek_names)
    if roll < 0.45:
        return (rng.choice(SERVICES), "crypto.decrypt", "keyencryptionkey", kek, "success", rng.choice(IPS),
                {"bytes": rng.randint(32, 4096)})
    if roll < 0.65:
        dk = str(rng.randint(1, max(n_data_keys, 1)))
        return (rng.choice(SERVICES), "datakey.created", "datakey", dk, "success", rng.choice(IPS),
                {"kek": kek, "key_spec": "AES_256"})
    if roll < 0.80:
        return (rng.choice(SERVICES), "crypto.encrypt", "keyencryptionkey", kek, "success", rng.choice(IPS),
                {"bytes": rng.randint(32, 4096)})
    if roll < 0.90:
        dk = str(rng.randint(1, max(n_data_keys, 1)))
        return (rng.choice(PEOPLE + SERVICES), "datakey.unwrapped", "datakey", dk, "success", rng.choice(IPS), {})
    if roll < 0.97:
        first = rng.randint(1, max(n_data_keys, 1))
        return ("system:rotation-engine", "rotation.batch", "keyencryptionkey", kek, "success", None,
                {"run_id": rng.randint(1, 50), "first_id": first, "last_id": first + 999, "rewrapped": 1000})
    if roll < 0.995:
        return ("user:" + rng.choice(["root", "admin", "guest", "test"]), "auth.login_failed", "", "", "failure",
                rng.choice(IPS), {"username_hmac": "hmac-sha256:" + "%064x" % rng.getrandbits(256)})
    if roll < 0.999:
        return (rng.choice(PEOPLE), "auth.access_denied", "keyencryptionkey", kek, "denied", rng.choice(IPS),
                {"permission": "keyvault.rotate_keyencryptionkey"})
    return (rng.choice(PEOPLE + SYSTEM), "kek.rotated", "keyencryptionkey", kek, "success", None,
            {"new_version": rng.randint(2, 9), "reason": "scheduled"})


def seed_audit_events(conn, n: int, *, kek_names: list[str], n_data_keys: int, start: datetime,
                      end: datetime) -> tuple[int, str]:
    """Append ``n`` events to the chain the services started; returns the new head."""
    from django.conf import settings

    from keyvault import audit
    from keyvault.models import AuditChainHead, AuditCheckpoint

    head = AuditChainHead.objects.get(pk=1)
    sequence, prev_hash = head.last_sequence, head.last_hash
    last_cp = AuditCheckpoint.objects.order_by("-sequence").first()
    prev_signature = last_cp.signature if last_cp else ""
    interval = settings.AUDIT_CHECKPOINT_INTERVAL
    signing_key, public_key = audit._signing_key(), audit.public_key_hex()
    checkpoints = []
    rng = random.Random(7)
    step = (end - start) / max(n, 1)
    canonical, sha256, dumps = audit.canonical_bytes, hashlib.sha256, json.dumps
    columns = ("sequence, timestamp, actor, action, target_type, target_id, outcome, request_id, ip_address, "
               "details, prev_hash, hash")
    with conn.cursor() as cur, cur.copy(f"COPY keyvault_auditevent ({columns}) FROM STDIN") as copy:
        lines = []
        for i in range(n):
            sequence += 1
            timestamp = start + step * i
            actor, action, target_type, target_id, outcome, ip, details = _event_shape(rng, kek_names, n_data_keys)
            request_id = "%032x" % rng.getrandbits(128) if ip else ""
            digest = sha256(canonical(
                sequence=sequence, timestamp=timestamp, actor=actor, action=action, target_type=target_type,
                target_id=target_id, outcome=outcome, request_id=request_id, ip_address=ip, details=details,
                prev_hash=prev_hash,
            )).hexdigest()
            lines.append(
                f"{sequence}\t{timestamp.isoformat()}\t{actor}\t{action}\t{target_type}\t{target_id}\t{outcome}\t"
                f"{request_id}\t{ip or chr(92) + 'N'}\t{_copy_text(dumps(details))}\t{prev_hash}\t{digest}\n"
            )
            if interval and sequence % interval == 0:
                signature = signing_key.sign(audit._checkpoint_message(sequence, digest, prev_signature)).hex()
                checkpoints.append((sequence, digest, timestamp, public_key, prev_signature, signature))
                prev_signature = signature
            prev_hash = digest
            if len(lines) >= COPY_CHUNK:
                copy.write("".join(lines))
                lines.clear()
        if lines:
            copy.write("".join(lines))
    with conn.cursor() as cur:
        with cur.copy("COPY keyvault_auditcheckpoint (sequence, event_hash, signed_at, public_key, prev_signature, "
                      "signature) FROM STDIN") as copy:
            for row in checkpoints:
                copy.write_row(row)
        cur.execute("UPDATE keyvault_auditchainhead SET last_sequence = %s, last_hash = %s WHERE id = 1",
                    (sequence, prev_hash))
    conn.commit()
    # Witnessed as audit.record's checkpoints are, or `audit verify` would find the witness missing.
    from keyvault.audit.witness import WitnessEntry, publish

    for cp_sequence, digest, signed_at, key, prev_sig, signature in checkpoints:
        publish(WitnessEntry(cp_sequence, digest, prev_sig, signature, key,
                             signed_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")))
    return sequence, prev_hash


def sha256_chain_baseline(n: int) -> float:
    """Seconds to hash-chain ``n`` event-sized documents in Python: the floor under ``audit verify``."""
    document = b"x" * 330  # about the size of a seeded event's canonical document
    digest = "0" * 64
    sha256 = hashlib.sha256
    started = time.perf_counter()
    for _ in range(n):
        digest = sha256(document + digest.encode()).hexdigest()
    return time.perf_counter() - started


def vacuum_analyze(db_name: str) -> None:
    import psycopg

    with psycopg.connect(dbname=db_name, autocommit=True, **c.PG) as conn:
        for table in ("keyvault_datakey", "keyvault_auditevent", "keyvault_auditcheckpoint"):
            conn.execute(f"VACUUM (ANALYZE) {table}")


# -- the live console ----------------------------------------------------------------------


GUNICORN = Path(c.PYTHON).parent / "gunicorn"
GUNICORN_CONF = c.ROOT / "deploy" / "gunicorn.conf.py"


def default_server() -> str:
    return "gunicorn" if GUNICORN.exists() and GUNICORN_CONF.exists() else "runserver"


def start_server(env: dict, data_dir: Path, kind: str) -> tuple[c.Process, str]:
    port = c.free_port()
    # Plain HTTP on 127.0.0.1 (in production TLS ends at the proxy): no HTTPS redirect, and
    # cookies without the Secure flag, or the client could not send them back.
    env = {**env, "HMD_SECURE_SSL_REDIRECT": "false", "HMD_SECURE_COOKIES": "false",
           "HMD_BIND": f"127.0.0.1:{port}"}
    if kind == "gunicorn":  # the production web process (Procfile), its settings from deploy/
        args = [str(GUNICORN), "-c", str(GUNICORN_CONF)]
    else:
        args = [c.PYTHON, "manage.py", "runserver", f"127.0.0.1:{port}", "--noreload"]
    server = c.Process(args, env, data_dir / "server.log")
    base = f"http://127.0.0.1:{port}"

    def up():
        import requests

        if not server.alive():
            raise RuntimeError(f"the server exited:\n{server.tail()}")
        try:
            response = requests.get(base + "/login/", timeout=5, allow_redirects=False)
        except (requests.ConnectionError, requests.Timeout):  # not listening yet, or workers still booting
            return False
        if response.status_code != 200:
            raise RuntimeError(f"GET /login/ answered {response.status_code} {response.headers.get('Location', '')}"
                               f"\n{server.tail(30)}")
        return True

    c.wait_for(up, timeout=120, what="the console server")
    return server, base


def login(base: str, username: str, password: str, token=None):
    import requests

    session = requests.Session()
    session.get(base + "/login/", timeout=10).raise_for_status()
    response = session.post(
        base + "/login/",
        data={"username": username, "password": password, "csrfmiddlewaretoken": session.cookies["csrftoken"],
              "next": "/"},
        headers={"Referer": base + "/login/"}, timeout=10, allow_redirects=False,
    )
    if response.status_code != 302:
        raise RuntimeError(f"login failed ({response.status_code})")
    # Two-factor login (production default): the console sends us to the token form first.
    response = session.get(base + "/", timeout=10)
    if 'name="token"' in response.text and token is not None:
        response = session.post(
            response.url, data={"token": token(), "csrfmiddlewaretoken": session.cookies["csrftoken"]},
            headers={"Referer": response.url}, timeout=10,
        )
    if response.status_code != 200 or 'name="token"' in response.text or 'name="password"' in response.text:
        raise RuntimeError(f"could not reach the console after login ({response.status_code} {response.url})")
    return session


def pages(keks: dict, extras: list, n_data_keys: int, end: datetime, head: int) -> list[tuple[str, str]]:
    payments = keks["payments"]
    day = (end - timedelta(days=3)).date()
    month_from, month_to = (end - timedelta(days=200)).date(), (end - timedelta(days=170)).date()
    week_from, week_to = (end - timedelta(days=100)).date(), (end - timedelta(days=94)).date()
    request_id = sample_request_id(head // 2)
    fingerprint = sample_fingerprint(n_data_keys // 2)
    return [
        ("KEKs: first page", "/keyvault/keyencryptionkey/"),
        ("KEKs: filter state=disabled", "/keyvault/keyencryptionkey/?state__exact=disabled"),
        ("KEKs: search 'team-01'", "/keyvault/keyencryptionkey/?q=team-01"),
        ("KEK detail + coverage (payments)", f"/keyvault/keyencryptionkey/{payments.pk}/change/"),
        ("data keys: first page", "/keyvault/datakey/"),
        ("data keys: filter KEK=payments", f"/keyvault/datakey/?kek__id__exact={payments.pk}"),
        ("data keys: owner lookup", "/keyvault/datakey/?owner_ref=owner-04242"),
        ("data keys: keyset page, middle", f"/keyvault/datakey/?before={max(2, n_data_keys // 2)}"),
        ("data key detail", f"/keyvault/datakey/{max(1, n_data_keys // 2)}/change/"),
        ("key versions: first page", "/keyvault/keyversion/"),
        ("key versions: filter", f"/keyvault/keyversion/?kek__id__exact={payments.pk}"),
        ("audit: first page", "/keyvault/auditevent/"),
        ("audit: filter action=kek.rotated", "/keyvault/auditevent/?action__exact=kek.rotated"),
        ("audit: filter actor", "/keyvault/auditevent/?actor=user:mallory"),
        ("audit: filter target (KEK)", "/keyvault/auditevent/?target_type=keyencryptionkey&target_id=payments"),
        ("audit: date range (one day)", f"/keyvault/auditevent/?from={day}&to={day}"),
        ("audit: date range (a week, 100 days ago)", f"/keyvault/auditevent/?from={week_from}&to={week_to}"),
        ("audit: search actor 'svc-crm'", "/keyvault/auditevent/?q=svc-crm"),
        ("audit: search actor 'mallory'", "/keyvault/auditevent/?q=mallory"),
        ("audit: search target 'payments'", "/keyvault/auditevent/?q=payments"),
        ("audit: search target (data key id)", f"/keyvault/auditevent/?q={max(1, n_data_keys // 3)}"),
        ("audit: search request id", f"/keyvault/auditevent/?q={request_id}"),
        ("audit: outcome=failure", "/keyvault/auditevent/?outcome=failure"),
        ("audit: outcome=denied", "/keyvault/auditevent/?outcome=denied"),
        ("audit: outcome=failure or denied", "/keyvault/auditevent/?outcome=problems"),
        ("audit: outcome=denied + a month", f"/keyvault/auditevent/?outcome=denied&from={month_from}&to={month_to}"),
        ("audit: search 'mallory' + failures", "/keyvault/auditevent/?q=mallory&outcome=problems"),
        ("audit: keyset page, middle of the log", f"/keyvault/auditevent/?before={head // 2}"),
        ("audit: keyset page, oldest events", "/keyvault/auditevent/?before=200"),
        ("audit: keyset page, newer than middle", f"/keyvault/auditevent/?after={head // 2}"),
        ("audit checkpoints: first page", "/keyvault/auditcheckpoint/"),
        # issue 16: the global search page (keyvault.console.search), by name, by number and by request id
        ("global search: KEK name 'team-01'", "/search/?q=team-01"),
        ("global search: KEK name 'payments'", "/search/?q=payments"),
        ("global search: data key / run id", f"/search/?q={max(1, n_data_keys // 2)}"),
        ("global search: data key fingerprint", f"/search/?q={fingerprint}"),
        ("global search: fingerprint prefix (6 hex)", f"/search/?q={fingerprint[:6]}"),
        ("global search: request id", "/search/?q=" + "0" * 32),
        ("reports: index", "/reports/"),
        ("report who-did-what: first page", "/reports/activity/"),
        ("report who-did-what: user=mallory", "/reports/activity/?user=mallory"),
        ("report who-did-what: kek=payments", "/reports/activity/?kek=payments"),
        ("report who-did-what: keyset page, middle", f"/reports/activity/?after={head // 2}"),
        ("report who-did-what: user, page after middle", f"/reports/activity/?user=mallory&after={head // 2}"),
        ("report who-did-what: a month", f"/reports/activity/?since={month_from}&until={month_to}"),
        ("report who-did-what: kek + a month", f"/reports/activity/?kek=payments&since={month_from}&until={month_to}"),
        ("report: key inventory", "/reports/inventory/"),
        ("report: rotations", "/reports/rotations/"),
        ("report: violations", "/reports/violations/"),
    ]


def sample_fingerprint(data_key_id: int) -> str:
    """The stored fingerprint of a seeded data key near ``data_key_id``, for the search-by-fingerprint pages."""
    from keyvault.models import DataKey

    row = DataKey.objects.filter(pk__gte=data_key_id).order_by("pk").values_list("fingerprint", flat=True).first()
    return row or "0" * 16


def sample_request_id(sequence: int) -> str:
    """A request id from the seeded log, near ``sequence``, for the search-by-request-id page."""
    from keyvault.models import AuditEvent

    event = AuditEvent.objects.filter(sequence__gte=sequence).exclude(request_id="").order_by("sequence").first()
    return event.request_id if event else "0" * 32


#: Streamed CSV exports timed (POST, recorded in the audit log): label and the report's filters.
CSV_EXPORTS = (
    ("who-did-what CSV: user=mallory", {"user": "mallory"}),
    ("who-did-what CSV: one month", "month"),
)


def time_csv_exports(session, base: str, end: datetime, repeats: int, full: bool) -> list[tuple]:
    """Time to first byte and to the seal of the streamed activity CSV; the seal must be on the last line."""
    month = {"since": str((end - timedelta(days=200)).date()), "until": str((end - timedelta(days=170)).date())}
    exports = [(label, month if data == "month" else data) for label, data in CSV_EXPORTS]
    if full:
        exports.append(("who-did-what CSV: every event", {}))
    results = []
    for label, data in exports:
        firsts, totals, size, rows = [], [], 0, 0
        for _ in range(repeats):
            started = time.perf_counter()
            response = session.post(base + "/reports/activity/export.csv",
                                    data={**data, "csrfmiddlewaretoken": session.cookies["csrftoken"]},
                                    headers={"Referer": base + "/reports/activity/"}, stream=True, timeout=1800)
            response.raise_for_status()
            first = None
            body = bytearray()
            for chunk in response.iter_content(chunk_size=65536):
                if first is None:
                    first = (time.perf_counter() - started) * 1000
                body += chunk
            totals.append(time.perf_counter() - started)
            firsts.append(first or 0.0)
            lines = bytes(body).rstrip(b"\n").rsplit(b"\n", 2)
            if not lines[-1].startswith(b"# keyvault-export: body-sha256="):
                raise RuntimeError(f"{label}: the streamed CSV has no seal on its last line")
            rows = int(lines[-2].split(b":")[1])
            size = len(body)
        results.append((label, rows, size, c.median(firsts), c.median(totals)))
    return results


#: Text a page must show to count as the right answer (a fast wrong page must not pass).
EXPECTED_TEXT = {
    "global search: data key fingerprint": "data key #",
    "global search: fingerprint prefix (6 hex)": "data key #",
    "global search: KEK name 'payments'": "payments",
}


def time_inventory_counts(rounds: int) -> tuple[float, float, float]:
    """In this process, interleaved: data keys per KEK version as the inventory report can get them.

    One ``version_coverage`` count per KEK (what the report did before), one grouped count of
    every data key, and the per-version counters the key services keep
    (``services.coverage_by_kek``, what the report and the home page read now). Returns the
    three medians in ms, after checking all three agree.
    """
    from django.db import connection
    from django.db.models import Count

    from keyvault.keys import services
    from keyvault.models import DataKey, KeyEncryptionKey

    keks = list(KeyEncryptionKey.objects.order_by("pk"))

    def per_kek():
        return {kek.pk: counts for kek in keks if (counts := services.version_coverage(kek))}

    def grouped():
        coverage: dict = {}
        for kek_id, number, n in (DataKey.objects.values("kek_id", "kek_version").annotate(n=Count("id"))
                                  .order_by().values_list("kek_id", "kek_version", "n")):
            coverage.setdefault(kek_id, {})[number] = n
        return coverage

    def counters():
        return services.coverage_by_kek([kek.pk for kek in keks])

    if not per_kek() == grouped() == counters():
        raise RuntimeError("the counts per KEK version disagree")
    samples: dict = {per_kek: [], grouped: [], counters: []}
    for _ in range(rounds):
        for measure in samples:
            started = time.perf_counter()
            measure()
            samples[measure].append((time.perf_counter() - started) * 1000)
    connection.close()
    return c.median(samples[per_kek]), c.median(samples[grouped]), c.median(samples[counters])


def time_pages(session, base: str, page_list, requests_per_page: int) -> list[tuple]:
    results = []
    for label, path in page_list:
        started = time.perf_counter()
        response = session.get(base + path, timeout=120)
        first = (time.perf_counter() - started) * 1000
        if response.status_code == 404:
            results.append((label, path, None, "not in the console (404)"))
            continue
        if response.status_code != 200 or 'name="username"' in response.text:
            results.append((label, path, None, f"HTTP {response.status_code}"))
            continue
        note = ""
        expected = EXPECTED_TEXT.get(label)
        if expected is not None and expected not in response.text:
            note = f"{expected!r} missing: wrong result"
        elif "?q=" in path and not path.startswith("/search/") and not re.search(r'id="searchbar"', response.text):
            note = "no search box: q ignored"
        elif "?e=" in response.url:
            note = "filter refused by the admin"
        samples = []
        for _ in range(requests_per_page):
            started = time.perf_counter()
            response = session.get(base + path, timeout=120)
            samples.append((time.perf_counter() - started) * 1000)
            response.raise_for_status()
        results.append((label, path, (first, c.median(samples), c.percentile(samples, 0.95)), note))
    return results


# -- main ----------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="data keys to seed (default 1 000 000)")
    parser.add_argument("--audit-n", type=int, default=None, help="audit events to seed (default: --n)")
    parser.add_argument("--extra-keks", type=int, default=40, help="KEKs without data keys, for the KEK list")
    parser.add_argument("--server", choices=["gunicorn", "runserver"], default=default_server(),
                        help="web server (default: gunicorn with deploy/gunicorn.conf.py when installed)")
    parser.add_argument("--requests", type=int, default=20, help="timed requests per page")
    parser.add_argument("--db", default="kv_bench_console", help="PostgreSQL database (dropped and recreated)")
    parser.add_argument("--data-dir", help="data folder (default: a temporary folder, removed at the end)")
    parser.add_argument("--keep", action="store_true", help="leave the database and data folder in place")
    parser.add_argument("--skip-verify", action="store_true", help="time the pages only, not audit verify")
    parser.add_argument("--csv-requests", type=int, default=3, help="timed downloads per streamed CSV export")
    parser.add_argument("--csv-all", action="store_true", help="also stream the whole log as one CSV")
    args = parser.parse_args()
    audit_n = args.n if args.audit_n is None else args.audit_n

    data_dir, own_dir = c.make_data_dir(args.data_dir, "kv-bench-console-")
    env = c.instance_env(data_dir, args.db)
    server = None
    total_started = time.perf_counter()
    try:
        c.log(f"creating database {args.db} and migrating")
        c.create_database(args.db)
        migrate_s, _ = c.manage(env, "migrate", "-v0")
        c.manage(env, "collectstatic", "--noinput", "-v0")  # as a deployment does (hashed static names)
        c.setup_django(env)

        started = time.perf_counter()
        keks, extras = create_inventory(args.extra_keks)
        username, password, token = create_admin()
        inventory_s = time.perf_counter() - started

        end = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
        start = end - timedelta(days=365)
        with c.connect(args.db) as conn:
            c.log(f"seeding {args.n:,} data keys with COPY")
            started = time.perf_counter()
            seed_data_keys(conn, keks, args.n, start=start, end=end)
            from keyvault.keys import services as key_services

            key_services.recount_data_keys()  # loaded around the services: their per-version counters catch up
            dek_s = time.perf_counter() - started
            c.log(f"seeding {audit_n:,} chained audit events with COPY")
            started = time.perf_counter()
            head_sequence, _ = seed_audit_events(conn, audit_n, kek_names=list(keks), n_data_keys=args.n,
                                                 start=start, end=end)
            audit_s = time.perf_counter() - started
        c.log("VACUUM ANALYZE")
        started = time.perf_counter()
        vacuum_analyze(args.db)
        vacuum_s = time.perf_counter() - started

        c.log(f"starting the console ({args.server}, HMD_DEBUG=false)")
        server, base = start_server(env, data_dir, args.server)
        session = login(base, username, password, token)
        c.log(f"timing pages ({args.requests} requests each)")
        results = time_pages(session, base, pages(keks, extras, args.n, end, head_sequence), args.requests)
        c.log("timing data-key counts per KEK version (in-process)")
        inventory_before_ms, inventory_grouped_ms, inventory_counters_ms = time_inventory_counts(
            max(5, args.requests // 2))
        c.log("timing streamed CSV exports")
        csv_results = time_csv_exports(session, base, end, args.csv_requests, args.csv_all)
        server.stop()
        server = None

        if not args.skip_verify:
            c.log("manage.py audit verify")
            verify_s, verify_out = c.manage(env, "audit", "verify", timeout=1800)
            from keyvault import audit

            from keyvault.audit import walk as audit_walk

            started = time.perf_counter()
            in_process = audit.verify_chain()
            walk_s = time.perf_counter() - started
            started = time.perf_counter()
            one_connection = audit.verify_chain(jobs=1)
            one_s = time.perf_counter() - started
            baseline_s = sha256_chain_baseline(in_process.events)

        print()
        print(f"Keyvault console benchmark: {args.n:,} data keys, {head_sequence:,} audit events "
              f"({len(keks) + len(extras)} KEKs), PostgreSQL, HMD_DEBUG=false, {args.server}, {os.cpu_count()} CPUs")
        print(f"setup: migrate {migrate_s:.1f} s, KEKs via services {inventory_s:.1f} s, "
              f"COPY data keys {dek_s:.1f} s ({args.n / dek_s:,.0f}/s), "
              f"COPY audit chain {audit_s:.1f} s ({audit_n / audit_s:,.0f}/s), VACUUM ANALYZE {vacuum_s:.1f} s")
        print()
        rows = []
        for label, path, figures, note in results:
            if figures is None:
                rows.append((label, "-", "-", "-", "skipped", note))
                continue
            first, med, p95 = figures
            rows.append((label, f"{first:.0f}", f"{med:.1f}", f"{p95:.1f}", c.met(med < PAGE_TARGET_MS), note))
        c.print_table(("page", "first ms", "median ms", "p95 ms", f"< {PAGE_TARGET_MS:.0f} ms", "note"), rows)
        print()
        c.print_table(("streamed CSV export (informational)", "rows", "MB", "first byte ms", "total s", "rows/s"),
                      [(label, f"{rows:,}", f"{size / 1e6:.1f}", f"{first:.0f}", f"{total:.2f}",
                        f"{rows / total:,.0f}") for label, rows, size, first, total in csv_results])
        print(f"\ndata keys per KEK version, in-process medians: one count per KEK {inventory_before_ms:.1f} ms "
              f"(before), one grouped count {inventory_grouped_ms:.1f} ms "
              f"({inventory_grouped_ms / inventory_before_ms:.2f}x), the services' counters "
              f"{inventory_counters_ms:.1f} ms ({inventory_counters_ms / inventory_before_ms:.3f}x)")
        timed = [r for r in results if r[2] is not None]
        pages_met = all(r[2][1] < PAGE_TARGET_MS and "wrong result" not in r[3] for r in timed)
        print(f"\npages: {sum(r[2][1] < PAGE_TARGET_MS for r in timed)}/{len(timed)} medians < "
              f"{PAGE_TARGET_MS:.0f} ms: {c.met(pages_met)}")
        if args.skip_verify:
            print(f"\ntotal wall time {time.perf_counter() - total_started:.0f} s (audit verify skipped)")
            return 0 if pages_met else 1
        verify_target = VERIFY_TARGET_S_PER_MILLION * max(head_sequence, 1) / 1_000_000
        print()
        c.print_table(
            ("operation", "events", "wall s", "events/s", f"< {verify_target:.1f} s"),
            [("manage.py audit verify", f"{head_sequence:,}", f"{verify_s:.1f}", f"{head_sequence / verify_s:,.0f}",
              c.met(verify_s < verify_target)),
             (f"audit.verify_chain() in-process, {audit_walk.default_jobs()} connections", f"{in_process.events:,}",
              f"{walk_s:.1f}", f"{in_process.events / walk_s:,.0f}", c.met(walk_s < verify_target)),
             ("audit.verify_chain(jobs=1), one connection", f"{one_connection.events:,}", f"{one_s:.1f}",
              f"{one_connection.events / one_s:,.0f}", c.met(one_s < verify_target)),
             ("baseline: SHA-256 chaining only (no reading)", f"{in_process.events:,}", f"{baseline_s:.1f}",
              f"{in_process.events / baseline_s:,.0f}", "-")],
        )
        print(f"  verify / SHA-256 baseline: {verify_s / baseline_s:.1f}x (manage.py), "
              f"{walk_s / baseline_s:.1f}x (in-process), {one_s / baseline_s:.1f}x (one connection)")
        print(f"  {verify_out}")
        print(f"\ntotal wall time {time.perf_counter() - total_started:.0f} s")
        return 0 if pages_met and verify_s < verify_target else 1
    finally:
        if server is not None:
            server.stop()
        if not args.keep:
            c.discard_instance(args.db, data_dir, own_dir)


if __name__ == "__main__":
    sys.exit(main())
