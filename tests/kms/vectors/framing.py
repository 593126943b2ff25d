"""Each framing provider's header writer and reader, as the known-answer vectors call them.

``framing_v1.json`` was captured through these functions from the provider code
before the framing moved into ``keyvault/kms/wire.py``; they now call the code
as it is, and the same vectors must still come out (tests/kms/test_framing_vectors.py).
"""

from __future__ import annotations

from keyvault.kms import aws, gcp, pkcs11, vault
from keyvault.kms.errors import InvalidCiphertext
from keyvault.kms.local import LocalKMSProvider


def parse_local(frame: bytes) -> dict:
    # LocalKMSProvider.decrypt_parts: the length checks, then _parse_header on the cut header.
    try:
        header_end = frame[1] + 6
    except IndexError:
        raise InvalidCiphertext() from None
    if len(frame) < header_end + 28:
        raise InvalidCiphertext()
    key_id, version = LocalKMSProvider._parse_header(frame[:header_end])
    return {"key_id": key_id, "version": version, "header_end": header_end}


def parse_pkcs11(frame: bytes) -> dict:
    key_id, version, header_end = pkcs11._parse_header(frame)
    return {"key_id": key_id, "version": version, "header_end": header_end}


def parse_gcp(frame: bytes) -> dict:
    key_id, version, header_end = gcp.GCPKMSProvider._parse_header(frame)
    return {"key_id": key_id, "version": version, "header_end": header_end}


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


PARSERS = {"local": parse_local, "pkcs11": parse_pkcs11, "gcp": parse_gcp, "vault": parse_vault, "aws": parse_aws}


def pack(provider: str, fields: dict) -> bytes:
    """The bytes ``provider`` writes for ``fields`` (for vault: the whole ciphertext)."""
    if provider == "local":
        return LocalKMSProvider._header(fields["key_id"], fields["version"])
    if provider == "pkcs11":
        return pkcs11._header(fields["key_id"], fields["version"])
    if provider == "gcp":
        return gcp.GCPKMSProvider._header(fields["key_id"], fields["version"])
    if provider == "vault":
        return vault.pack_ciphertext(fields["key_name"], fields["vault_ciphertext"])
    header = aws._Header(
        payload=fields["payload"], reference=fields["reference"], key_arn=fields["key_arn"], version=fields["version"]
    )
    return header.pack()
