"""Encryption contexts: the canonical encoding, and BoundContext (encoded once, used everywhere a mapping is)."""

import copy
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keyvault.kms import BoundContext, encode_context
from keyvault.kms.context import EMPTY_BOUND, EMPTY_CONTEXT, normalise_context

contexts = st.dictionaries(st.text(max_size=20), st.text(max_size=40), max_size=8)


def test_the_encoding_is_the_documented_layout():
    # u32 count, then per pair sorted by key: u32 len ‖ key ‖ u32 len ‖ value (UTF-8, big-endian)
    expected = (
        b"\x00\x00\x00\x02"
        b"\x00\x00\x00\x05table\x00\x00\x00\x07payroll"
        b"\x00\x00\x00\x06tenant\x00\x00\x00\x05acm\xc3\xa9"
    )

    assert encode_context({"tenant": "acmé", "table": "payroll"}) == expected
    assert BoundContext({"table": "payroll", "tenant": "acmé"}).encoded == expected


@given(contexts)
def test_a_bound_context_encodes_exactly_as_the_mapping_does(pairs):
    bound = BoundContext(pairs)

    assert bound.encoded == encode_context(pairs)
    assert encode_context(bound) is bound.encoded  # no second encoding
    assert bound == pairs and dict(bound) == pairs and normalise_context(bound) == pairs
    assert hash(bound) == hash(BoundContext(dict(reversed(list(pairs.items())))))


def test_empty_contexts_are_the_empty_encoding_itself():
    for empty in (BoundContext(), BoundContext({}), BoundContext(None), EMPTY_BOUND):
        assert empty.encoded is EMPTY_CONTEXT
        assert not empty and len(empty) == 0
    assert encode_context(None) is EMPTY_CONTEXT


def test_a_bound_context_is_a_read_only_mapping():
    bound = BoundContext({"tenant": "acme"})
    source = {"tenant": "acme"}
    copied = BoundContext(source)
    source["tenant"] = "changed later"

    assert copied["tenant"] == "acme"  # it keeps its own copy
    assert list(bound) == ["tenant"] and "tenant" in bound and bound.get("nope") is None
    with pytest.raises(TypeError):
        bound["tenant"] = "evil"  # type: ignore[index]
    with pytest.raises(AttributeError):
        bound.encoded = b"forged"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del bound._pairs


def test_it_survives_copying_and_pickling():
    bound = BoundContext({"tenant": "acme", "table": "payroll"})

    for clone in (copy.copy(bound), copy.deepcopy(bound), pickle.loads(pickle.dumps(bound))):
        assert clone == bound and clone.encoded == bound.encoded and type(clone) is BoundContext
    assert repr(bound) == "BoundContext({'tenant': 'acme', 'table': 'payroll'})"


def test_equality_with_other_mappings_and_values():
    bound = BoundContext({"a": "1"})

    assert bound == {"a": "1"} and bound != {"a": "2"} and bound == BoundContext({"a": "1"})
    assert bound != [("a", "1")] and bound != "a"
    assert len({bound, BoundContext({"a": "1"}), BoundContext({"a": "2"})}) == 2


@pytest.mark.parametrize(
    "bad", [{"a": 1}, {1: "a"}, {"a": None}, [("a", "b")], "ab", 42], ids=["int value", "int key", "None", "list", "str", "int"]
)
def test_malformed_contexts_are_type_errors(bad):
    with pytest.raises(TypeError):
        BoundContext(bad)


def test_an_oversized_context_is_refused():
    with pytest.raises(ValueError, match="larger than"):
        BoundContext({"k": "v" * 70_000})
