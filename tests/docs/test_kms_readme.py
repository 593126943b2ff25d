"""Every Python snippet of ``keyvault/kms/README.md`` runs, against the backend its fence names.

A fence says where its snippet runs: ``python local``, ``python aws`` (a moto server),
``python gcp`` (the Cloud KMS emulator), ``python vault`` (an OpenBao dev server with Transit
enabled at ``transit/``), ``python pkcs11`` (SoftHSM2 with a token labelled ``keyvault``) or
``python django`` (after ``django.setup()``, on a scratch data folder shared by the
document's ``django`` snippets, in order). Each snippet runs in a fresh ``python`` process,
as a reader would paste it; the names in capitals it leaves to the reader (``KEYRING_PATH``,
``AWS_ENDPOINT_URL``, ``VAULT_ADDR``, ``VAULT_TOKEN``, ``PIN``; a fresh keyring path per local snippet) are assigned first, and the
``HMD_GCP_*`` variables the gcp snippet reads point at the emulator.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.docs.examples import ROOT, Block, blocks

pytestmark = pytest.mark.slow

KMS_README = ROOT / "keyvault" / "kms" / "README.md"
TARGETS = ("local", "aws", "gcp", "vault", "pkcs11", "django")
SNIPPET_TIMEOUT = 120


def snippets(path: Path = KMS_README) -> list[Block]:
    return [block for block in blocks(path) if block.language == "python"]


def target_of(block: Block) -> str:
    named = block.tags & set(TARGETS)
    assert len(named) == 1, f"{block}: tag the fence with one of {TARGETS} (```python local), not {block.info!r}"
    return named.pop()


@contextmanager
def backend(target: str, workdir: Path) -> Iterator[tuple[dict[str, str], dict[str, str]]]:
    """(names in capitals, environment) for snippets of ``target``, with its real server running."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HMD_", "AWS_", "VAULT_", "BAO_", "GOOGLE_"))}
    base.pop("DJANGO_SETTINGS_MODULE", None)
    if target == "local":
        yield {"KEYRING_PATH": str(workdir / "local.keyring")}, base
    elif target == "aws":
        from tests.servers.moto import FAKE_AWS_ENV, running_moto_server

        with running_moto_server() as moto:
            yield {"AWS_ENDPOINT_URL": moto.endpoint_url}, {**base, **FAKE_AWS_ENV}
    elif target == "gcp":
        from tests.servers.gcp_kms import CloudKMSEmulator

        emulator = CloudKMSEmulator().start()
        try:
            yield {}, {**base, "HMD_GCP_PROJECT": "acme-prod", "HMD_GCP_LOCATION": "europe-west3",
                       "HMD_GCP_KEY_RING": "keyvault", "HMD_GCP_KMS_ENDPOINT": emulator.url,
                       "HMD_GCP_ANONYMOUS_CREDENTIALS": "true"}
        finally:
            emulator.stop()
    elif target == "vault":
        from tests.servers.openbao import running_openbao

        with running_openbao() as bao:
            bao.enable_secrets_engine("transit", "transit")
            yield {"VAULT_ADDR": bao.addr, "VAULT_TOKEN": bao.root_token}, base
    elif target == "pkcs11":
        from tests.servers.softhsm import SoftHSM

        hsm = SoftHSM(workdir / "softhsm", labels=("keyvault",)).start()
        try:
            yield {"PIN": hsm.token("keyvault").pin}, {**base, "SOFTHSM2_CONF": str(hsm.config)}
        finally:
            hsm.stop()
    elif target == "django":
        data = workdir / "data"
        data.mkdir(mode=0o700)
        yield {}, {**base, "HMD_DATA_DIR": str(data), "HMD_DEBUG": "true", "DJANGO_SETTINGS_MODULE": "keyvault.settings"}
    else:
        raise ValueError(f"no backend {target!r}")


def run_snippet(block: Block, names: dict[str, str], env: dict[str, str], *, django: bool) -> subprocess.CompletedProcess:
    prelude = [f"{name} = {value!r}" for name, value in names.items()]
    if django:
        prelude += ["import django", "django.setup()"]
    script = "\n".join(prelude) + "\n" + block.text
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=SNIPPET_TIMEOUT)


def test_every_snippet_names_where_it_runs():
    found = snippets()

    assert len(found) >= 9
    for block in found:
        target_of(block)  # fails with the block's file:line when the fence names no backend


@pytest.mark.parametrize("target", TARGETS)
def test_kms_readme_snippets_run(target, tmp_path):
    # given the README's snippets for this backend, and the backend itself
    mine = [block for block in snippets() if target_of(block) == target]
    assert mine, f"keyvault/kms/README.md has no ```python {target} snippet"
    with backend(target, tmp_path) as (names, env):
        # then each runs to the end, in order
        for block in mine:
            if "KEYRING_PATH" in names:  # each local snippet makes a keyring of its own, under its own master key
                names = {**names, "KEYRING_PATH": str(tmp_path / f"line-{block.line}.keyring")}
            result = run_snippet(block, names, env, django=target == "django")
            assert result.returncode == 0, f"{block} exited {result.returncode}:\n{result.stdout}{result.stderr}"


def test_a_broken_snippet_fails(tmp_path):
    # given a snippet calling an API the provider does not have
    doc = tmp_path / "README.md"
    doc.write_text('```python local\nfrom keyvault.kms.local import LocalKMSProvider\n'
                   'LocalKMSProvider.from_config({"keyring_path": KEYRING_PATH}).create("k")\n```\n')
    (block,) = snippets(doc)

    with backend(target_of(block), tmp_path) as (names, env):
        result = run_snippet(block, names, env, django=False)

    # then its run fails, with the reason
    assert result.returncode != 0 and "Error" in result.stderr
