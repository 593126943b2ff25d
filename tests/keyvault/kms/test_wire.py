"""keyvault/kms/wire.py: the one codec of the providers' ciphertext framing.

Properties: what is packed reads back; whatever bytes arrive, a reader answers
with fields or with the one opaque InvalidCiphertext, never IndexError,
struct.error or UnicodeDecodeError; a truncated or bit-flipped frame is refused
or reads as something else.
"""

import base64
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyvault.kms import wire
from keyvault.kms.errors import InvalidCiphertext
from tests.keyvault.kms.vectors.framing import PARSERS, pack

key_ids = st.text(min_size=1, max_size=64).filter(lambda text: 0 < len(text.encode("utf-8")) <= 255)
versions = st.integers(min_value=0, max_value=2**32 - 1)
PROVIDERS = sorted(PARSERS)


def parse_or_refuse(provider: str, frame: bytes):
    """The parsed fields, or None for InvalidCiphertext; any other exception fails the test."""
    try:
        return PARSERS[provider](frame)
    except InvalidCiphertext:
        return None


def valid_frames() -> st.SearchStrategy[tuple[str, bytes]]:
    """A provider and a frame its parser accepts (a packed header and a backend part)."""
    vault_bodies = st.binary(min_size=28, max_size=64).map(lambda b: base64.b64encode(b).decode())
    return st.one_of(
        st.tuples(st.just("local"), key_ids, versions, st.binary(min_size=28, max_size=64)).map(
            lambda t: (t[0], pack("local", {"key_id": t[1], "version": t[2]}) + t[3])
        ),
        st.tuples(
            st.just("pkcs11"), st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,40}", fullmatch=True), versions,
            st.binary(min_size=28, max_size=64),
        ).map(lambda t: (t[0], pack("pkcs11", {"key_id": t[1], "version": t[2]}) + t[3])),
        st.tuples(
            st.just("gcp"), st.from_regex(r"[a-zA-Z0-9_-]{1,63}", fullmatch=True), versions.filter(bool),
            st.binary(min_size=1, max_size=64),
        ).map(lambda t: (t[0], pack("gcp", {"key_id": t[1], "version": t[2]}) + t[3])),
        st.tuples(
            st.just("vault"), st.from_regex(r"[A-Za-z0-9_]{1,20}", fullmatch=True),
            st.integers(min_value=1, max_value=2**31 - 1), vault_bodies,
        ).map(lambda t: (t[0], pack("vault", {"key_name": t[1], "vault_ciphertext": f"vault:v{t[2]}:{t[3]}"}))),
        st.tuples(
            st.just("aws"), st.sampled_from([0, 1]), key_ids, st.text(max_size=40).map(lambda s: "arn:" + s),
            versions.filter(bool), st.binary(min_size=1, max_size=64),
        ).map(
            lambda t: (
                t[0],
                pack("aws", {"payload": t[1], "reference": t[2], "key_arn": t[3], "version": t[4]}) + t[5],
            )
        ),
    )


# -- the key header -----------------------------------------------------------------------


@given(key_ids, versions, st.binary(max_size=64))
def test_key_header_round_trip(key_id, version, trailer):
    header = wire.KeyHeader().pack(key_id, version)

    assert wire.KeyHeader().read(header + trailer) == (key_id, version, len(header))
    assert len(header) == wire.KEY_HEADER_FIXED + len(key_id.encode("utf-8"))


@given(st.binary(max_size=80))
def test_key_header_reads_any_bytes_or_refuses_opaquely(data):
    layout = wire.KeyHeader(key_id_pattern=re.compile(r"^[a-z]+$"), min_version=1, min_trailer=3)
    try:
        key_id, version, header_end = layout.read(data)
    except InvalidCiphertext:
        return
    assert data[0] == wire.FORMAT_VERSION and re.match(r"^[a-z]+$", key_id) and version >= 1
    assert len(data) - header_end >= 3


@pytest.mark.parametrize("key_id", ["", "x" * 256, "é" * 128])
def test_key_header_refuses_to_write_what_it_could_not_read(key_id):
    with pytest.raises(ValueError):
        wire.KeyHeader().pack(key_id, 1)


@pytest.mark.parametrize("version", [-1, 2**32])
def test_key_header_refuses_versions_outside_u32(version):
    with pytest.raises((ValueError, OverflowError)):
        wire.KeyHeader().pack("k", version)


# -- the reader ----------------------------------------------------------------------------


@given(st.binary(max_size=300), st.sampled_from([1, 2]))
def test_prefixed_round_trip(data, width):
    framed = wire.prefixed(data, width) + b"tail"
    reader = wire.FrameReader(framed)

    assert reader.take(reader.u8() if width == 1 else reader.u16()) == data
    assert reader.rest() == b"tail"


def test_prefixed_refuses_what_does_not_fit():
    with pytest.raises(ValueError):
        wire.prefixed(bytes(256), 1)


@given(st.binary(max_size=40), st.lists(st.sampled_from(["u8", "u16", "u32", "text1", "text2", "take3", "rest5"])))
def test_reader_fails_only_with_invalid_ciphertext(data, steps):
    reader = wire.FrameReader(data)
    operations = {
        "u8": reader.u8,
        "u16": reader.u16,
        "u32": reader.u32,
        "text1": lambda: reader.prefixed_text(1, "utf-8"),
        "text2": lambda: reader.prefixed_text(2, "ascii", allow_empty=True),
        "take3": lambda: reader.take(3),
        "rest5": lambda: reader.rest(5),
    }
    try:
        for step in steps:
            before = reader.offset
            operations[step]()
            assert before <= reader.offset <= len(data)
    except InvalidCiphertext:
        pass


@pytest.mark.parametrize("value", ["text", 1, None, ["b"]])
def test_as_frame_refuses_what_is_not_bytes(value):
    with pytest.raises(InvalidCiphertext):
        wire.as_frame(value)


def test_as_frame_takes_bytes_like_values():
    assert wire.as_frame(bytearray(b"ab")) == wire.as_frame(memoryview(b"ab")) == b"ab"


# -- every provider's framing ---------------------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
@given(data=st.binary(max_size=120))
def test_any_bytes_parse_or_are_invalid_ciphertext(provider, data):
    parse_or_refuse(provider, data)


@settings(max_examples=300)
@given(valid_frames(), st.data())
def test_truncation_is_refused_or_reads_differently(frame, data):
    provider, whole = frame
    parsed = parse_or_refuse(provider, whole)
    assert parsed is not None
    cut = data.draw(st.integers(min_value=0, max_value=len(whole) - 1))

    shorter = parse_or_refuse(provider, whole[:cut])

    # Cutting into the backend's part may leave a header that still reads the same (the backend then refuses).
    assert shorter is None or shorter != parsed or cut >= parsed.get("header_end", len(whole))


@settings(max_examples=300)
@given(valid_frames(), st.data())
def test_a_flipped_bit_is_refused_or_reads_differently(frame, data):
    provider, whole = frame
    parsed = parse_or_refuse(provider, whole)
    bit = data.draw(st.integers(min_value=0, max_value=len(whole) * 8 - 1))
    flipped = bytearray(whole)
    flipped[bit // 8] ^= 1 << (bit % 8)

    after = parse_or_refuse(provider, bytes(flipped))

    header_end = parsed.get("header_end")
    in_backend_part = header_end is not None and bit // 8 >= header_end
    assert after is None or after != parsed or in_backend_part
