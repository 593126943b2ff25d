"""The JSON keyring format for signing keys (no Django imports: settings read Keyvault's own from it).

The project's settings parse ``HMD_SECRET_KEY_KEYRING`` with it and the cookie-signing
executor (``rotation.executors.cookie``) rotates it, so it sits below both.

``{"current": "<key>", "previous": ["<older key>", ...]}`` — the Django model of
``SECRET_KEY`` + ``SECRET_KEY_FALLBACKS``: the current key signs, previous keys only
verify, newest first, and are dropped once nothing signed with them is still alive.
Other applications can read the same document (e.g. as a ``MultiFernet`` key list).
"""

from __future__ import annotations

import json
import secrets

#: 256-bit keys, URL-safe base64 (43 characters).
KEY_BYTES = 32


class KeyringError(ValueError):
    """The text is not a keyring document."""


def new_key() -> str:
    return secrets.token_urlsafe(KEY_BYTES)


def parse(text: str) -> tuple[str, list[str]]:
    """``(current, previous)`` from a keyring document.

    :raises KeyringError: not JSON, no current key, or previous is not a list of strings.
    """
    try:
        document = json.loads(text)
    except (TypeError, ValueError):
        raise KeyringError("keyring is not JSON") from None
    if not isinstance(document, dict) or not isinstance(document.get("current"), str) or not document["current"]:
        raise KeyringError('keyring needs a non-empty "current" key')
    previous = document.get("previous", [])
    if not isinstance(previous, list) or not all(isinstance(key, str) and key for key in previous):
        raise KeyringError('"previous" must be a list of keys')
    return document["current"], list(previous)


def dump(current: str, previous: list[str]) -> str:
    return json.dumps({"current": current, "previous": previous}, indent=2)


def rotated(text: str, new: str | None = None) -> tuple[str, str, str]:
    """A keyring with a new current key; the old current becomes the first previous key.

    Returns ``(document, new key, demoted key)``.
    """
    current, previous = parse(text)
    new = new or new_key()
    return dump(new, [current, *[key for key in previous if key != current]]), new, current


def without(text: str, retired: set[str]) -> tuple[str, int]:
    """The keyring without the ``retired`` previous keys; returns ``(document, how many were removed)``."""
    current, previous = parse(text)
    kept = [key for key in previous if key not in retired]
    return dump(current, kept), len(previous) - len(kept)
