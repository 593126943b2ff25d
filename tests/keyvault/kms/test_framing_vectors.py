"""Known-answer vectors for every provider's ciphertext framing (tests/keyvault/kms/vectors/framing_v1.json).

The vectors were captured from the provider code before the framing moved into
``keyvault/kms/wire.py``: passing them shows the bytes on disk did not change,
so every ciphertext written before still opens.
"""

import json
from pathlib import Path

import pytest

from keyvault.kms.errors import InvalidCiphertext
from tests.keyvault.kms.vectors.framing import PARSERS, pack

VECTORS = json.loads((Path(__file__).parent / "vectors" / "framing_v1.json").read_text())


def cases(kind: str) -> list:
    return [
        pytest.param(provider, vector, id=f"{provider}-{vector.get('name', index)}")
        for provider, vectors in VECTORS.items()
        for index, vector in enumerate(vectors[kind])
    ]


def test_every_framing_provider_has_vectors():
    assert set(VECTORS) == {"local", "pkcs11", "gcp", "vault", "aws"} == set(PARSERS)


@pytest.mark.parametrize(("provider", "vector"), cases("pack"))
def test_pack_writes_the_recorded_bytes(provider, vector):
    assert pack(provider, vector["fields"]).hex() == vector["header_hex"]


@pytest.mark.parametrize(("provider", "vector"), cases("parse"))
def test_parse_reads_the_recorded_fields_or_refuses_opaquely(provider, vector):
    frame = bytes.fromhex(vector["frame_hex"])

    if vector["parsed"] is None:
        with pytest.raises(InvalidCiphertext):
            PARSERS[provider](frame)
    else:
        assert PARSERS[provider](frame) == vector["parsed"]
