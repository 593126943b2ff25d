"""docs/ops/secrets.md shows the policies Keyvault really needs and really uses."""

from __future__ import annotations

from tests.docs.examples import ROOT, blocks

SECRETS_DOC = ROOT / "docs" / "ops" / "secrets.md"


def _hcl(tag: str) -> str:
    found = [block.text for block in blocks(SECRETS_DOC) if block.language == "hcl" and tag in block.tags]
    assert len(found) == 1, f"secrets.md should have one hcl block tagged {tag!r}, found {len(found)}"
    return found[0]


def test_the_transit_policy_shown_is_the_one_the_provider_needs():
    from keyvault.kms.vault import policy_hcl

    # given the policy the doc shows, when compared with the provider's own
    # then they are the same text (the executed example loads policy_hcl() into OpenBao)
    assert _hcl("keyvault-transit") == policy_hcl()


def test_the_kv_policy_shown_is_the_one_the_example_loads():
    # given the KV read policy the doc shows
    shown = _hcl("keyvault-config")

    # then an executed block writes exactly that policy to OpenBao
    loaded = [b.text for b in blocks(SECRETS_DOC) if b.language == "console" and "policy write keyvault-config" in b.text]
    assert loaded and shown in loaded[0]


def test_the_doc_points_keyvault_at_openbao_and_moto():
    console = [block for block in blocks(SECRETS_DOC) if block.language == "console"]
    tags = {tag for block in console for tag in block.tags}
    text = "\n".join(block.text for block in console)

    assert {"openbao", "moto"} <= tags
    for command in ("kms health", "kms create-key", "kms encrypt", "kms decrypt", "--kind migrate", "HMD_SECRET_KEY_REF=vault:"):
        assert command in text, f"no executed example runs {command!r}"
