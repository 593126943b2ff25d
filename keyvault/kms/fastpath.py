"""Which tuple-returning fast paths of a provider the envelope may call directly.

A provider may offer ``decrypt_parts(ciphertext, encryption_context)`` returning
``(plaintext, key_id, key_version)`` and ``generate_data_key_parts(key_id,
encryption_context)`` returning ``(plaintext bytearray, ciphertext, key_version)``
as the single implementation behind its ``decrypt`` and ``generate_data_key``
(the local provider does). The envelope calls them with the ciphertext as ``bytes``
and the context as a :class:`~keyvault.kms.context.BoundContext` (never ``None`` or
a dict), so they need not check either. Calling them skips building result objects, which
costs as much as the AES-GCM call on a local key. They are used only where they
are exactly what the public method would run: a subclass that overrides the
public method, or an instance whose method was replaced, is always called
through it.

A provider that wraps another (the metrics proxy) defines
``envelope_fast_paths()`` to say what it offers instead: the wrapped provider's
paths, wrapped again in whatever it adds.
"""

from __future__ import annotations

from collections.abc import Callable

from .base import KMSProvider

#: ``(decrypt_parts or None, generate_data_key_parts or None)``
FastPaths = tuple[Callable | None, Callable | None]

_by_class: dict[type, tuple[bool, bool]] = {}


def _runs_through(cls: type, public: str, parts: str) -> bool:
    """Whether ``cls.public`` is the method that comes with ``cls.parts`` (not overridden below it)."""
    owner = next((klass for klass in cls.__mro__ if parts in vars(klass)), None)
    public_owner = next((klass for klass in cls.__mro__ if public in vars(klass)), None)
    return owner is not None and owner is public_owner


def provider_fast_paths(provider: KMSProvider) -> FastPaths:
    """The provider's ``decrypt_parts`` and ``generate_data_key_parts`` where they are safe to call directly."""
    cls = type(provider)
    own = getattr(cls, "envelope_fast_paths", None)
    if own is not None:
        return own(provider)
    known = _by_class.get(cls)
    if known is None:
        known = _by_class[cls] = (
            _runs_through(cls, "decrypt", "decrypt_parts"),
            _runs_through(cls, "generate_data_key", "generate_data_key_parts"),
        )
    patched = getattr(provider, "__dict__", {})  # methods replaced on the instance
    use_decrypt = known[0] and "decrypt" not in patched and "decrypt_parts" not in patched
    use_generate = known[1] and "generate_data_key" not in patched and "generate_data_key_parts" not in patched
    return (
        provider.decrypt_parts if use_decrypt else None,
        provider.generate_data_key_parts if use_generate else None,
    )
