"""The AWS policies in docs/ops/secrets.md fit the provider and grant nothing dangerous unconditioned.

The IAM sample once required the tag ``keyvault:managed`` while Keyvault tags its keys
``keyvault:name`` (so rotation was denied), and granted ``kms:TagResource`` on ``*``
unconditioned (so the role could tag any key and then schedule its deletion).
"""

from __future__ import annotations

import json
import re

import pytest

from keyvault.kms.aws import NAME_TAG
from tests.docs.examples import ROOT, blocks

SECRETS_DOC = ROOT / "docs" / "ops" / "secrets.md"
#: Actions that can take a key away from its owner: relabel it, or destroy it.
DANGEROUS = {"kms:TagResource", "kms:UntagResource", "kms:ScheduleKeyDeletion", "kms:CreateKey"}
TAG_CONDITION_KEY = re.compile(r"^aws:(?:ResourceTag|RequestTag)/(.+)$")


def policies() -> list[dict]:
    found = []
    for block in blocks(SECRETS_DOC):
        if block.language == "json":
            document = json.loads(block.text)
            if isinstance(document, dict) and "Statement" in document:
                found.append(document)
    return found


def statements() -> list[dict]:
    return [statement for policy in policies() for statement in policy["Statement"]]


def _actions(statement: dict) -> set[str]:
    actions = statement.get("Action", [])
    return {actions} if isinstance(actions, str) else set(actions)


def _grants(statement: dict, action: str) -> bool:
    return statement["Effect"] == "Allow" and any(
        pattern == action or (pattern.endswith("*") and action.startswith(pattern[:-1])) for pattern in _actions(statement))


def _is_root_delegation(statement: dict) -> bool:
    # "the account administers" in a key policy: hands the key to IAM, grants no role anything itself
    principal = statement.get("Principal", {})
    arns = principal.get("AWS", []) if isinstance(principal, dict) else []
    arns = [arns] if isinstance(arns, str) else arns
    return bool(arns) and all(arn.endswith(":root") for arn in arns)


def _tag_keys(statement: dict) -> set[str]:
    keys = set()
    for operator, pairs in statement.get("Condition", {}).items():
        for key, value in pairs.items():
            match = TAG_CONDITION_KEY.match(key)
            if match:
                keys.add(match.group(1))
            if key == "aws:TagKeys":
                keys |= set([value] if isinstance(value, str) else value)
    return keys


def test_the_doc_shows_an_iam_policy_and_a_key_policy():
    assert len(policies()) >= 2
    assert any(statement["Sid"] == "KeyvaultKeyLifecycle" for statement in statements())


def test_every_tag_the_policies_name_is_the_one_the_provider_puts_on_its_keys():
    named = {key for statement in statements() for key in _tag_keys(statement)}
    assert named == {NAME_TAG}
    # and the prose names no other keyvault tag
    assert set(re.findall(r"(?<!urn:)keyvault:[a-z]+", SECRETS_DOC.read_text())) == {NAME_TAG}  # urn:keyvault:api:… are problem types


@pytest.mark.parametrize("action", sorted(DANGEROUS))
def test_no_statement_grants_tagging_or_deletion_unconditioned(action):
    unconditioned = [statement.get("Sid", "?") for statement in statements()
                     if _grants(statement, action) and not statement.get("Condition") and not _is_root_delegation(statement)]
    assert unconditioned == []


def test_key_management_is_limited_to_keys_carrying_the_tag():
    for statement in statements():
        if statement["Effect"] != "Allow" or _is_root_delegation(statement):
            continue
        managing = _actions(statement) & {"kms:ScheduleKeyDeletion", "kms:DisableKey", "kms:RotateKeyOnDemand"}
        if managing:
            condition = statement.get("Condition", {})
            assert condition.get("Null", {}).get(f"aws:ResourceTag/{NAME_TAG}") == "false", statement["Sid"]


def test_tagging_is_limited_to_the_tag_and_keyvault_keys_cannot_be_relabelled():
    taggers = [s for s in statements() if _grants(s, "kms:TagResource") and not _is_root_delegation(s)]
    assert taggers
    for statement in taggers:
        condition = statement["Condition"]
        assert condition["ForAllValues:StringEquals"]["aws:TagKeys"] == [NAME_TAG]
        assert condition["Null"][f"aws:RequestTag/{NAME_TAG}"] == "false"
    denies = [s for s in statements() if s["Effect"] == "Deny" and {"kms:TagResource", "kms:UntagResource"} <= _actions(s)]
    assert denies and denies[0]["Condition"]["Null"][f"aws:ResourceTag/{NAME_TAG}"] == "false"


def test_the_checks_catch_the_old_policy():
    old = {"Sid": "KeyvaultCreateKeys", "Effect": "Allow",
           "Action": ["kms:CreateKey", "kms:TagResource", "kms:CreateAlias", "kms:ListKeys"], "Resource": "*"}
    assert _grants(old, "kms:TagResource") and not old.get("Condition")
    assert _tag_keys({"Condition": {"StringEquals": {"aws:ResourceTag/keyvault:managed": "true"}}}) == {"keyvault:managed"}
