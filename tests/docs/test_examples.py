"""Every runnable example in docs/ops executes against a scratch instance; config samples parse; links resolve."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.docs.examples import DOCS, ROOT, all_blocks, blocks
from tests.scratch import make_scratch

pytestmark = pytest.mark.slow

CONSOLE_DOCS = sorted({block.path for block in all_blocks("console")})


@pytest.fixture(scope="module")
def external_env(tmp_path_factory):
    """Real servers for blocks tagged ``openbao`` or ``moto``, started only if a doc asks for them."""
    tags = {tag for block in all_blocks("console") for tag in block.tags}
    env, stops = {}, []
    if "openbao" in tags:
        from tests.servers.openbao import running_openbao

        manager = running_openbao()
        server = manager.__enter__()
        stops.append(lambda: manager.__exit__(None, None, None))
        env.update(HMD_TEST_VAULT_ADDR=server.addr, HMD_TEST_VAULT_TOKEN=server.root_token)
    if "moto" in tags:
        from tests.servers.moto import running_moto_server

        manager = running_moto_server()
        server = manager.__enter__()
        stops.append(lambda: manager.__exit__(None, None, None))
        env.update(HMD_TEST_AWS_ENDPOINT=server.endpoint_url if hasattr(server, "endpoint_url") else str(server),
                   AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    yield env
    for stop in stops:
        stop()


@pytest.mark.parametrize("doc", CONSOLE_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_console_examples_run(doc, tmp_path, external_env):
    scratch = make_scratch(tmp_path / "instance")
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "keyvault", "worker", "--pool", "solo", "--loglevel", "WARNING"],
        cwd=ROOT, env={**scratch.env, **external_env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    scratch.extra_env.update(external_env)
    try:
        for block in [b for b in blocks(doc) if b.language == "console"]:
            result = scratch.shell(block.text, check=False, timeout=180)
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


@pytest.mark.parametrize("doc", DOCS + [ROOT / "README.md"], ids=lambda p: str(p.relative_to(ROOT)))
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
