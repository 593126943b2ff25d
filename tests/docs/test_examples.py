"""Every runnable example in docs/ and README.md executes against a scratch instance; config samples parse; links resolve."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from tests.docs.examples import EXAMPLE_DOCS, ROOT, all_blocks, blocks
from tests.scratch import make_scratch

pytestmark = pytest.mark.slow

CONSOLE_DOCS = sorted({block.path for block in all_blocks("console")})
#: Seconds one console block may take (a block of a dozen commands on a loaded CI machine).
BLOCK_TIMEOUT = 300


@contextmanager
def external_servers(tags: set[str]) -> Iterator[dict[str, str]]:
    """Fresh real servers for one document's ``console openbao`` / ``console moto`` blocks.

    Yields the variables those blocks read: ``HMD_TEST_VAULT_ADDR`` and
    ``HMD_TEST_VAULT_TOKEN`` (an OpenBao dev server: KV v2 at ``secret/``, nothing
    else enabled, so the doc shows every setup step), ``HMD_TEST_AWS_ENDPOINT`` (a
    moto server) plus the fake AWS credentials of ``tests.servers.moto``. One set of
    servers per document, so documents cannot see each other's keys or mounts.
    """
    env: dict[str, str] = {}
    with ExitStack() as stack:
        if "openbao" in tags:
            from tests.servers.openbao import running_openbao

            bao = stack.enter_context(running_openbao())
            env.update(HMD_TEST_VAULT_ADDR=bao.addr, HMD_TEST_VAULT_TOKEN=bao.root_token)
        if "moto" in tags:
            from tests.servers.moto import FAKE_AWS_ENV, running_moto_server

            moto = stack.enter_context(running_moto_server())
            env.update(HMD_TEST_AWS_ENDPOINT=moto.endpoint_url, **FAKE_AWS_ENV)
        yield env


def _block_env(scratch, external: dict[str, str]) -> dict[str, str]:
    """The scratch instance's environment, the servers' variables, and no real cloud or Vault settings."""
    from tests.servers.moto import SCRUBBED_AWS_ENV

    env = {**scratch.env, **external, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    for name in list(env):
        if name in SCRUBBED_AWS_ENV or name.startswith(("VAULT_", "BAO_", "GOOGLE_")):
            del env[name]
    return env


def test_external_servers_export_what_the_docs_use():
    # given the two server kinds docs can ask for
    with external_servers({"openbao", "moto"}) as env:
        # then every documented variable is set and the servers answer at those addresses
        assert env["HMD_TEST_VAULT_ADDR"].startswith("http://127.0.0.1:")
        assert env["HMD_TEST_VAULT_TOKEN"]
        assert env["HMD_TEST_AWS_ENDPOINT"].startswith("http://127.0.0.1:")
        assert env["AWS_ACCESS_KEY_ID"] == "testing" and env["AWS_CONFIG_FILE"] == os.devnull
        with urllib.request.urlopen(env["HMD_TEST_VAULT_ADDR"] + "/v1/sys/health", timeout=5) as response:
            assert json.loads(response.read())["sealed"] is False
        with urllib.request.urlopen(env["HMD_TEST_AWS_ENDPOINT"] + "/moto-api/data.json", timeout=5) as response:
            assert response.status == 200


@pytest.mark.parametrize("doc", CONSOLE_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_console_examples_run(doc, tmp_path):
    console = [b for b in blocks(doc) if b.language == "console"]
    tags = {tag for block in console for tag in block.tags}
    scratch = make_scratch(tmp_path / "instance")
    with external_servers(tags) as external, ExitStack() as stack:
        env = _block_env(scratch, external)
        if "server" in tags:
            from tests.servers.keyvault import web_server

            env["KEYVAULT_URL"], _ = stack.enter_context(web_server(scratch, tmp_path / "gunicorn.log"))
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "keyvault", "worker", "--pool", "solo", "--loglevel", "WARNING"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        try:
            for block in console:
                result = subprocess.run(
                    ["bash", "-euo", "pipefail", "-c", block.text], capture_output=True, text=True,
                    cwd=ROOT, env=env, timeout=BLOCK_TIMEOUT,
                )
                output = result.stdout + result.stderr
                if block.expect_failure:
                    assert result.returncode != 0, f"{block} should fail but exited 0:\n{output}"
                else:
                    assert result.returncode == 0, f"{block} exited {result.returncode}:\n{output}"
                for expected in block.expectations:
                    assert expected in output, f"{block}: expected {expected!r} in:\n{output}"
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(timeout=30)


@pytest.mark.parametrize("block", all_blocks("json"), ids=str)
def test_json_samples_parse(block):
    json.loads(block.text)


@pytest.mark.parametrize("block", all_blocks("yaml"), ids=str)
def test_yaml_samples_parse(block):
    import yaml

    documents = [doc for doc in yaml.safe_load_all(block.text) if doc is not None]
    assert documents, f"{block} is empty"


@pytest.mark.parametrize("block", all_blocks("hcl"), ids=str)
def test_hcl_samples_parse(block):
    import hcl2

    assert hcl2.loads(block.text)


LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(path: Path) -> set[str]:
    text = path.read_text()
    anchors = set(re.findall(r'<a id="([^"]+)"', text))
    for heading in re.findall(r"^#+\s+(.+)$", text, re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


@pytest.mark.parametrize("doc", EXAMPLE_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    for target in LINK.findall(doc.read_text()):
        if re.match(r"^[a-z]+:", target):
            continue  # absolute URLs are not fetched (no network)
        file_part, _, anchor = target.partition("#")
        path = (doc.parent / file_part).resolve() if file_part else doc
        assert path.exists(), f"{doc.relative_to(ROOT)} links to missing {target}"
        if anchor and path.suffix == ".md":
            assert anchor in _anchors(path), f"{doc.relative_to(ROOT)} links to missing anchor {target}"


def test_rotation_docs_match_the_runbook_files():
    result = subprocess.run(
        [sys.executable, "manage.py", "runbooks", "check", "docs/ops/key-rotation.md"],
        cwd=ROOT, capture_output=True, text=True,
        env={**{k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}},
    )
    assert result.returncode == 0, result.stderr
