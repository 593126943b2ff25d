"""Write the providers' framing vectors (python -m tests.keyvault.kms.vectors.make_framing_vectors FILE).

``framing_v1.json`` beside this file was captured (through ``framing.py``) from the provider code as it
stood before the framing moved into ``keyvault/kms/wire.py`` (commit "KMS framing:
known-answer vectors"): a record of formats already on disk. Never regenerate
it over the committed file; a new format gets a new file, and the old one keeps passing.

For each provider that frames its ciphertexts (local, pkcs11, gcp, vault, aws):
``pack`` vectors (fields -> the exact bytes written in front of the backend's
ciphertext) and ``parse`` vectors (a whole ciphertext -> the fields read from it,
or ``null`` where the provider answers ``InvalidCiphertext``). The backend's own
part (an AES-GCM nonce ‖ sealed data ‖ tag, a Cloud KMS or AWS blob, Vault's
``vault:vN:`` string) is filler here: its bytes are the backend's business.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

from keyvault.kms.errors import InvalidCiphertext
from tests.keyvault.kms.vectors.framing import PARSERS, pack

GCM_TRAILER = bytes(range(28))  # 12-byte nonce + 16-byte tag: the shortest sealed part
ARN = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
SEALED = base64.b64encode(bytes(range(40))).decode()


# -- the cases ---------------------------------------------------------------------


PACK_CASES = {
    "local": [
        {"key_id": "vector-kek", "version": 1},
        {"key_id": "tenants/acme:kek-2", "version": 2},
        {"key_id": "k", "version": 0xFFFFFFFF},
        {"key_id": "clé-ключ", "version": 7},
        {"key_id": "a" * 255, "version": 258},
    ],
    "pkcs11": [
        {"key_id": "hsm-kek", "version": 1},
        {"key_id": "tenants/acme:kek.2", "version": 65536},
        {"key_id": "Z" * 255, "version": 0xFFFFFFFF},
    ],
    "gcp": [
        {"key_id": "billing", "version": 3},
        {"key_id": "a" * 63, "version": 1},
        {"key_id": "k_-9", "version": 0xFFFFFFFF},
    ],
    "vault": [
        {"key_name": "billing", "vault_ciphertext": f"vault:v1:{SEALED}"},
        {"key_name": "tenant.acme-kek_2", "vault_ciphertext": f"vault:v2147483647:{SEALED}"},
        {"key_name": "k", "vault_ciphertext": "vault:v12:" + base64.b64encode(bytes(28)).decode()},
    ],
    "aws": [
        {"payload": 0, "reference": "alias/keyvault-billing", "key_arn": ARN, "version": 1},
        {"payload": 1, "reference": "k-e-y", "key_arn": ARN, "version": 258},
        {"payload": 0, "reference": ARN, "key_arn": ARN, "version": 0xFFFFFFFF},
    ],
}

#: Filler for the backend's own part of a ciphertext, per provider.
TRAILERS = {"local": GCM_TRAILER, "pkcs11": GCM_TRAILER, "gcp": b"CloudKMS", "vault": b"", "aws": b"AWS-blob"}


def header(provider: str, key: bytes, version: int) -> bytes:
    return bytes((1, len(key))) + key + version.to_bytes(4, "big")


def key_header_frames(provider: str) -> list[tuple[str, bytes]]:
    """Hand-made frames for the ``u8 format ‖ u8 L ‖ key id ‖ u32 version`` layout (local, pkcs11, gcp)."""
    good = header(provider, b"vector-kek", 2)
    trailer = TRAILERS[provider]
    return [
        ("valid", good + trailer),
        ("valid-long-trailer", good + trailer + b"more"),
        ("empty", b""),
        ("format-only", b"\x01"),
        ("format-2", b"\x02" + good[1:] + trailer),
        ("format-0", b"\x00" + good[1:] + trailer),
        ("zero-key-length", header(provider, b"", 2) + trailer),
        ("key-length-past-end", bytes((1, 200)) + b"vector-kek" + trailer),
        ("version-cut", good[:-2]),
        ("no-trailer", good),
        ("trailer-one-short", good + trailer[:-1]),
        ("non-utf8-key", header(provider, b"\xff\xfekey", 2) + trailer),
        ("non-ascii-key", header(provider, "clé".encode(), 2) + trailer),
        ("key-with-dot", header(provider, b"a.b", 2) + trailer),
        ("key-with-space", header(provider, b"a b", 2) + trailer),
        ("version-0", header(provider, b"vector-kek", 0) + trailer),
        ("version-max", header(provider, b"vector-kek", 0xFFFFFFFF) + trailer),
    ]


def vault_frames() -> list[tuple[str, bytes]]:
    def frame(name: bytes, text: str, length: int | None = None) -> bytes:
        return bytes((1, len(name) if length is None else length)) + name + text.encode()

    good = f"vault:v3:{SEALED}"
    return [
        ("valid", frame(b"billing", good)),
        ("empty", b""),
        ("format-only", b"\x01"),
        ("format-2", b"\x02" + frame(b"billing", good)[1:]),
        ("zero-name-length", frame(b"", good)),
        ("name-length-past-end", frame(b"billing", "", length=200)),
        ("name-length-short", frame(b"billing", good, length=3)),
        ("non-ascii-name", frame("clé".encode(), good)),
        ("name-starts-with-dash", frame(b"-x", good)),
        ("no-vault-part", frame(b"billing", "")),
        ("version-0", frame(b"billing", f"vault:v0:{SEALED}")),
        ("version-leading-zero", frame(b"billing", f"vault:v03:{SEALED}")),
        ("version-too-big", frame(b"billing", f"vault:v2147483648:{SEALED}")),
        ("sealed-too-short", frame(b"billing", "vault:v1:" + base64.b64encode(bytes(27)).decode())),
        ("non-canonical-base64", frame(b"billing", "vault:v1:" + SEALED[:-2] + "R=")),
        ("bad-base64", frame(b"billing", "vault:v1:" + SEALED[:-1])),
        ("trailing-byte", frame(b"billing", good + "\n")),
        ("non-ascii-tail", frame(b"billing", "vault:v1:" + SEALED) + b"\xc3\xa9"),
    ]


def aws_frames() -> list[tuple[str, bytes]]:
    def frame(reference: bytes, arn: bytes, version: int, *, fmt: int = 1, payload: int = 0) -> bytes:
        return (
            bytes((fmt, payload))
            + len(reference).to_bytes(2, "big")
            + reference
            + len(arn).to_bytes(2, "big")
            + arn
            + version.to_bytes(4, "big")
        )

    good = frame(b"k-e-y", ARN.encode(), 258)
    return [
        ("valid", good + b"AWS"),
        ("valid-empty-payload", frame(b"k-e-y", ARN.encode(), 1, payload=1) + b"AWS"),
        ("empty", b""),
        ("short", b"\x01"),
        ("format-2", frame(b"k-e-y", ARN.encode(), 1, fmt=2) + b"AWS"),
        ("payload-2", frame(b"k-e-y", ARN.encode(), 1, payload=2) + b"AWS"),
        ("empty-fields", bytes.fromhex("0100 0000 0000 00000001") + b"blob"),
        ("empty-reference", frame(b"", ARN.encode(), 1) + b"AWS"),
        ("arn-not-arn", frame(b"k-e-y", b"key/1234", 1) + b"AWS"),
        ("version-0", frame(b"k-e-y", ARN.encode(), 0) + b"AWS"),
        ("no-blob", good),
        ("version-cut", good[:-1]),
        ("reference-length-past-end", bytes.fromhex("0100 ffff") + b"k-e-y"),
        ("non-utf8-reference", frame(b"\xff", ARN.encode(), 1) + b"AWS"),
    ]


def parse_vectors(provider: str) -> list[dict]:
    if provider == "vault":
        frames = vault_frames()
    elif provider == "aws":
        frames = aws_frames()
    else:
        frames = key_header_frames(provider)
    # Every packed case, followed by the backend's part, must parse back to its own fields.
    frames += [(f"packed-{i}", pack(provider, case) + TRAILERS[provider]) for i, case in enumerate(PACK_CASES[provider])]
    vectors = []
    for name, frame in frames:
        try:
            parsed = PARSERS[provider](frame)
        except InvalidCiphertext:
            parsed = None
        vectors.append({"name": name, "frame_hex": frame.hex(), "parsed": parsed})
    return vectors


def main(target: Path) -> None:
    if target.exists():
        raise SystemExit(f"{target} exists: committed vectors are never regenerated")
    vectors = {
        provider: {
            "pack": [{"fields": case, "header_hex": pack(provider, case).hex()} for case in PACK_CASES[provider]],
            "parse": parse_vectors(provider),
        }
        for provider in PARSERS
    }
    target.write_text(json.dumps(vectors, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
