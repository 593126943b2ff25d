"""Remote providers for ``bench/rewrap.py``: the real servers, the delay proxy, loading, and the floors.

Each server is the one the test suite uses (``tests/servers``): OpenBao in dev mode,
moto's HTTP server, the Cloud KMS REST emulator. AWS and Cloud KMS are put behind
``tests.servers.http_proxy.HTTPProxy`` adding ``--delay-ms`` per request, as a real
region is that far away; the proxy (and the emulator) run in their own processes so
they share no interpreter lock with the floor's threads.

A floor talks to the server directly, the best way its API allows, and writes nothing
to the database: Vault's ``transit/rewrap`` with ``batch_input``, boto3 ``ReEncrypt``
from ``--threads`` threads, Cloud KMS decrypt + encrypt from as many threads. It uses the
providers' codecs only to read the stored ciphertext format.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

from bench import _common as c

#: Keep-alive connections the floors open (boto3's pool, the threads).
DEFAULT_THREADS = 16
VAULT_BATCH = 200

PROXY_SCRIPT = """
import sys, time
from tests.servers.http_proxy import HTTPProxy
proxy = HTTPProxy(sys.argv[1], delay=float(sys.argv[2])).start()
print(proxy.url, flush=True)
while True:
    time.sleep(3600)
"""
GCP_EMULATOR_SCRIPT = """
import time
from tests.servers.gcp_kms import CloudKMSEmulator
emulator = CloudKMSEmulator().start()
print(emulator.url, flush=True)
while True:
    time.sleep(3600)
"""


@dataclasses.dataclass
class Remote:
    """A provider's server as the benchmark sees it."""

    provider: str
    env: dict[str, str]
    details: dict
    description: str


def _serving(script: str, args: list[str], log: Path, stack: ExitStack) -> str:
    """Run a small Python server in its own process; returns the URL it prints."""
    import subprocess

    process = subprocess.Popen([c.PYTHON, "-c", script, *args], cwd=c.ROOT, stdout=subprocess.PIPE,
                               stderr=open(log, "ab"), text=True, start_new_session=True)
    stack.callback(lambda: (process.kill(), process.wait(timeout=10)))
    url = process.stdout.readline().strip()
    if not url.startswith("http"):
        raise RuntimeError(f"{script.split()[3]} did not start; see {log}")
    return url


def _delayed(upstream: str, delay_ms: float, data_dir: Path, stack: ExitStack) -> str:
    return _serving(PROXY_SCRIPT, [upstream, str(delay_ms / 1000)], data_dir / "proxy.log", stack)


@contextmanager
def serving(provider: str, data_dir: Path, *, delay_ms: float):
    """Start the provider's real server (and the delay proxy); yields a :class:`Remote`."""
    with ExitStack() as stack:
        if provider == "vault":
            from tests.servers.openbao import running_openbao

            server = stack.enter_context(running_openbao())
            server.enable_secrets_engine("transit", "transit")
            env = {"HMD_VAULT_ADDR": server.addr, "HMD_VAULT_TOKEN": server.root_token,
                   "HMD_VAULT_TRANSIT_MOUNT": "transit"}
            yield Remote(provider, env, {"addr": server.addr, "token": server.root_token, "mount": "transit"},
                         f"OpenBao {server.addr} (dev server, no added delay)")
        elif provider == "aws":
            from tests.servers.moto import FAKE_AWS_ENV, running_moto_server

            server = stack.enter_context(running_moto_server())
            url = _delayed(server.endpoint_url, delay_ms, data_dir, stack)
            env = {**FAKE_AWS_ENV, "HMD_AWS_REGION": server.region, "HMD_AWS_KMS_ENDPOINT_URL": url}
            yield Remote(provider, env, {"region": server.region, "endpoint_url": url},
                         f"moto server behind a proxy adding {delay_ms:g} ms per request")
        elif provider == "gcp":
            emulator = _serving(GCP_EMULATOR_SCRIPT, [], data_dir / "gcp-emulator.log", stack)
            url = _delayed(emulator, delay_ms, data_dir, stack)
            env = {"HMD_GCP_PROJECT": "keyvault-bench", "HMD_GCP_LOCATION": "global",
                   "HMD_GCP_KEY_RING": "bench", "HMD_GCP_KMS_ENDPOINT": url, "HMD_GCP_ANONYMOUS_CREDENTIALS": "true"}
            yield Remote(provider, env, {"endpoint": url},
                         f"Cloud KMS emulator behind a proxy adding {delay_ms:g} ms per request")
        else:
            raise ValueError(f"unknown remote provider {provider!r}")


# -- loading ------------------------------------------------------------------------------------


def load_data_keys(db: str, kek, n: int, *, threads: int) -> float:
    """``n`` real DEKs wrapped by the provider (from ``threads`` threads), COPYed in; returns seconds."""
    import logging

    from keyvault.keys.services import recount_data_keys
    from keyvault.kms import get_provider
    from keyvault.models import wrapped_key_fingerprint

    # More threads than the provider's connection pool: urllib3 says so for every extra connection.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)

    provider = get_provider(kek.provider)
    started = time.perf_counter()

    def wrap(i: int) -> tuple[bytes, str]:
        tenant = f"t{i % 997:04d}"
        with provider.generate_data_key(kek.provider_key_id, encryption_context={"tenant": tenant}) as dek:
            return dek.ciphertext, tenant

    with ThreadPoolExecutor(threads) as pool:
        wrapped = list(pool.map(wrap, range(n)))
    columns = ("kek_id, kek_version, wrapped_key, fingerprint, key_spec, encryption_context, purpose, owner_ref, "
               "created_at")
    with c.connect(db) as conn, conn.cursor() as cur:
        with cur.copy(f"COPY keyvault_datakey ({columns}) FROM STDIN") as copy:
            for i, (blob, tenant) in enumerate(wrapped):
                copy.write(f"{kek.pk}\t1\t\\\\x{blob.hex()}\t{wrapped_key_fingerprint(blob)}\tAES_256\t"
                           f'{{"tenant": "{tenant}"}}\tbench\towner-{i % 10007:05d}\tnow\n')
        conn.commit()
    recount_data_keys()  # the rows came in around the key services, which keep the per-version counts
    return time.perf_counter() - started


def stored_rows(kek) -> list[tuple[bytes, dict]]:
    from keyvault.models import DataKey

    return [(bytes(w), ctx) for w, ctx in DataKey.objects.filter(kek=kek).order_by("id")
            .values_list("wrapped_key", "encryption_context")]


# -- the floors -----------------------------------------------------------------------------------


def floor(remote: Remote, kek, rows, *, target_version: int, threads: int) -> float:
    """Rewrap ``rows`` with the server's own API, the best way it allows; returns seconds."""
    run = {"vault": _vault_floor, "aws": _aws_floor, "gcp": _gcp_floor}[remote.provider]
    started = time.perf_counter()
    run(remote, kek, rows, target_version=target_version, threads=threads)
    return time.perf_counter() - started


def _vault_floor(remote: Remote, kek, rows, *, target_version: int, threads: int) -> None:
    """``transit/rewrap`` with ``batch_input`` of 200, one connection, one process."""
    import requests

    from keyvault.kms.vault import _context, unpack_ciphertext

    details = remote.details
    session = requests.Session()
    session.headers["X-Vault-Token"] = details["token"]
    name = kek.provider_key_id
    entries = [{"ciphertext": unpack_ciphertext(w)[2], "context": _context(ctx)} for w, ctx in rows]
    for start in range(0, len(entries), VAULT_BATCH):
        chunk = entries[start:start + VAULT_BATCH]
        response = session.post(f"{details['addr']}/v1/{details['mount']}/rewrap/{name}", json={"batch_input": chunk},
                                timeout=60)
        response.raise_for_status()
        results = response.json()["data"]["batch_results"]
        if len(results) != len(chunk) or any(r.get("error") for r in results):
            raise RuntimeError("the Vault floor's rewrap failed for some items")
        if not results[-1]["ciphertext"].startswith(f"vault:v{target_version}:"):
            raise RuntimeError("the Vault floor did not rewrap to the newest version")


def _aws_floor(remote: Remote, kek, rows, *, target_version: int, threads: int) -> None:
    """boto3 ``ReEncrypt`` from ``threads`` threads, one shared client (its pool sized to match)."""
    import boto3
    from botocore.config import Config

    from keyvault.kms.aws import _Header

    client = boto3.client("kms", region_name=remote.details["region"], endpoint_url=remote.details["endpoint_url"],
                          config=Config(max_pool_connections=threads, retries={"max_attempts": 1}))

    def one(row) -> None:
        wrapped, context = row
        header, blob = _Header.unpack(wrapped)
        new = dataclasses.replace(header, version=target_version)
        client.re_encrypt(CiphertextBlob=blob, SourceKeyId=header.key_arn,
                          SourceEncryptionContext={**context, **header.context()},
                          DestinationKeyId=header.key_arn, DestinationEncryptionContext={**context, **new.context()})

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, rows))


def _gcp_floor(remote: Remote, kek, rows, *, target_version: int, threads: int) -> None:
    """Cloud KMS has no re-encrypt: decrypt, then encrypt under the new primary, from ``threads`` threads."""
    from keyvault.kms import get_provider
    from keyvault.kms.context import encode_context
    from keyvault.kms.gcp import HEADER

    provider = get_provider("gcp")
    client, key_id = provider._client, kek.provider_key_id
    key_name, version_name = provider._key_name(key_id), provider._version_name(key_id, target_version)
    new_header = HEADER.pack(key_id, target_version)

    def one(row) -> None:
        wrapped, context = row
        _, _, header_end = HEADER.read(wrapped)
        encoded = encode_context(context)
        opened = client.decrypt(request={"name": key_name, "ciphertext": wrapped[header_end:],
                                         "additional_authenticated_data": wrapped[:header_end] + encoded})
        client.encrypt(request={"name": version_name, "plaintext": opened.plaintext,
                                "additional_authenticated_data": new_header + encoded})

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, rows))


__all__ = ["DEFAULT_THREADS", "Remote", "floor", "load_data_keys", "serving", "stored_rows"]
