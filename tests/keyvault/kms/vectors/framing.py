"""Each framing provider's header writer and reader, as the known-answer vectors call them.

``framing_v1.json`` was captured through these functions from the provider code
before the framing moved into ``keyvault/kms/wire.py``; they now call the code
as it is, and the same vectors must still come out (tests/keyvault/kms/test_framing_vectors.py).
"""

from __future__ import annotations

from collections.abc import Callable

from keyvault.kms import aws, gcp, local, pkcs11, vault


def parse_key_header(module) -> Callable[[bytes], dict]:
    """local, pkcs11, gcp: the module's ``HEADER`` reader, the one its ``decrypt`` uses."""

    def parse(frame: bytes) -> dict:
        key_id, version, header_end = module.HEADER.read(frame)
        return {"key_id": key_id, "version": version, "header_end": header_end}

    return parse


def parse_vault(frame: bytes) -> dict:
    name, version, vault_ciphertext = vault.unpack_ciphertext(frame)
    return {"key_name": name, "version": version, "vault_ciphertext": vault_ciphertext}


def parse_aws(frame: bytes) -> dict:
    header, blob = aws._Header.unpack(frame)
    return {
        "payload": header.payload,
        "reference": header.reference,
        "key_arn": header.key_arn,
        "version": header.version,
        "context": header.context(),
        "blob_hex": blob.hex(),
    }


KEY_HEADER_MODULES = {"local": local, "pkcs11": pkcs11, "gcp": gcp}
PARSERS = {
    **{name: parse_key_header(module) for name, module in KEY_HEADER_MODULES.items()},
    "vault": parse_vault,
    "aws": parse_aws,
}


def pack(provider: str, fields: dict) -> bytes:
    """The bytes ``provider`` writes for ``fields`` (for vault: the whole ciphertext)."""
    if provider in KEY_HEADER_MODULES:
        return KEY_HEADER_MODULES[provider].HEADER.pack(fields["key_id"], fields["version"])
    if provider == "vault":
        return vault.pack_ciphertext(fields["key_name"], fields["vault_ciphertext"])
    header = aws._Header(
        payload=fields["payload"], reference=fields["reference"], key_arn=fields["key_arn"], version=fields["version"]
    )
    return header.pack()
