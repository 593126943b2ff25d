"""The Django envelope layer (keyvault/keys/envelopes.py): what a forged blob learns from opening it.

The rule is in keyvault/kms/README.md, "What a failed decrypt reveals": a version's state is
never said; the KEK's own state (disabled, pending deletion) may be.
"""

import struct

import pytest

from keyvault.exceptions import KeyNotUsable
from keyvault.keys import envelopes, services
from keyvault.kms import InvalidCiphertext
from keyvault.kms.envelope import MAGIC, read_header

pytestmark = pytest.mark.django_db
OPAQUE = str(InvalidCiphertext())


@pytest.fixture
def kek(system_actor, settings, tmp_path):
    from tests.keyvault import use_temp_keyring

    use_temp_keyring(settings, tmp_path)
    envelopes.forget()
    return services.create_kek(name="ledger", actor=system_actor)


def naming_version(blob: bytes, version: int) -> bytes:
    """``blob`` with its header's KEK version replaced (the envelope header is ours, and unauthenticated)."""
    at = len(MAGIC) + 2 + blob[len(MAGIC) + 1]
    return blob[:at] + struct.pack(">I", version) + blob[at + 4:]


def refusal(blob: bytes) -> tuple[type, str]:
    with pytest.raises(Exception) as raised:
        envelopes.open_blob(blob)
    return type(raised.value), str(raised.value)


@pytest.mark.parametrize("state", ["disabled", "destroyed"])
def test_a_blob_naming_a_retired_version_gets_the_one_opaque_error(kek, system_actor, state):
    # given a blob sealed under v1, then v2 primary and v1 retired (forced: the blob still needs it)
    old = envelopes.seal("ledger", b"v1 data")
    services.rotate_kek_version(kek, actor=system_actor, reason="test")
    envelopes.forget()  # the DEK cache would otherwise reuse v1's data key
    current = envelopes.seal("ledger", b"v2 data")
    assert read_header(current).kek_version == 2
    services.set_version_state(kek, 1, state, actor=system_actor, force=True, reason="test")
    envelopes.forget()

    # when the real v1 blob, a v2 blob forged to name v1, and one naming a version that never existed are opened
    answers = {refusal(old), refusal(naming_version(current, 1)), refusal(naming_version(current, 99))}

    # then all three get the same opaque error, word for word
    assert answers == {(InvalidCiphertext, OPAQUE)}
    assert read_header(naming_version(current, 1)).kek_version == 1  # the forgery did name v1
    assert envelopes.open_blob(current) == b"v2 data"


def test_a_disabled_kek_may_be_named_as_such(kek, system_actor):
    # given a blob of a KEK that is then disabled
    blob = envelopes.seal("ledger", b"data")
    services.disable_kek(kek, actor=system_actor, reason="test")
    envelopes.forget()

    # when it is opened, then the answer says the KEK (not a version) is not usable, as AWS KMS does
    error, message = refusal(blob)
    assert error is KeyNotUsable and "ledger" in message and "disabled" in message
