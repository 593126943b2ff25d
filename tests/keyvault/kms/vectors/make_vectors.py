"""Write a fresh set of known-answer vectors into a new folder (python -m tests.keyvault.kms.vectors.make_vectors DIR).

The committed vectors beside this file are a record of formats already in use:
never regenerate them. A new envelope or local-ciphertext format version gets
new vector files next to the old ones, and the old ones must keep decrypting.
The master key here is a test value, published on purpose; it protects nothing.
"""

import json
import sys
from pathlib import Path

from keyvault.kms.envelope import EnvelopeEncryptor, read_header
from keyvault.kms.local import LocalKMSProvider, generate_master_key

KEKS = ("vector-kek", "tenants/acme:kek-2")


def envelope_vector(name, encryptor, plaintext, context, blob=None):
    blob = blob if blob is not None else encryptor.encrypt(plaintext, encryption_context=context)
    header = read_header(blob)
    return {
        "name": name,
        "kek_id": header.kek_id,
        "kek_version": header.kek_version,
        "encryption_context": context,
        "plaintext_hex": plaintext.hex(),
        "blob_hex": blob.hex(),
    }


def main(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=False)
    master_key = generate_master_key()
    (folder / "master_key.txt").write_text(master_key + "\n")
    provider = LocalKMSProvider(folder / "keyring", master_key)
    for kek in KEKS:
        provider.create_key(kek, description="known-answer vectors")
    first = EnvelopeEncryptor(provider, KEKS[0])
    second = EnvelopeEncryptor(provider, KEKS[1])
    context = {"tenant": "acme", "purpose": "known-answer vector"}
    envelope = [
        envelope_vector("no-context", first, b"attack at dawn", None),
        envelope_vector("context", first, b"attack at dawn", context),
        envelope_vector("empty-plaintext", first, b"", context),
        envelope_vector("one-kib", first, bytes(range(256)) * 4, None),
        envelope_vector("second-kek-unicode-context", second, "grüße".encode(), {"café": "naïve ☕", "n": ""}),
    ]
    before_rotation = first.encrypt(b"written under version 1", encryption_context=context)
    provider.rotate_key(KEKS[0])
    envelope.append(envelope_vector("kek-version-2", first, b"written under version 2", context))
    envelope.append(
        envelope_vector(
            "rewrapped-to-version-2",
            first,
            b"written under version 1",
            context,
            blob=first.rewrap(before_rotation, encryption_context=context),
        )
    )
    envelope.append(
        envelope_vector("still-version-1", first, b"written under version 1", context, blob=before_rotation)
    )
    local = []
    for name, key_id, plaintext, ctx in [
        ("no-context", KEKS[0], b"local provider vector", None),
        ("context", KEKS[1], b"local provider vector", context),
        ("empty", KEKS[0], b"", context),
    ]:
        result = provider.encrypt(key_id, plaintext, encryption_context=ctx)
        local.append(
            {
                "name": name,
                "key_id": result.key_id,
                "key_version": result.key_version,
                "encryption_context": ctx,
                "plaintext_hex": plaintext.hex(),
                "ciphertext_hex": result.ciphertext.hex(),
            }
        )
    (folder / "envelope_v1.json").write_text(json.dumps(envelope, indent=2, ensure_ascii=False) + "\n")
    (folder / "local_v1.json").write_text(json.dumps(local, indent=2, ensure_ascii=False) + "\n")
    provider.lock_path.unlink()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
