"""Python client of Keyvault's application API (``/api/v1/``).

    from keyvault_client import KeyvaultClient, DataKeyCache

    client = KeyvaultClient("https://keyvault.example", token, cache=DataKeyCache())
    key = client.generate_data_key("billing-kek", {"service": "billing"})
    ...                                   # store key.id, encrypt locally with key.plaintext
    plaintext = client.unwrap(key.id, {"service": "billing"})   # after any KEK rotation too
"""

from keyvault_client.cache import DataKeyCache
from keyvault_client.client import DataKey, KeyvaultClient
from keyvault_client.errors import (
    BadRequest,
    ConnectionFailed,
    DecryptionFailed,
    Forbidden,
    KeyNotUsable,
    KeyvaultError,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ServerError,
    Unauthorized,
    Unavailable,
)

__all__ = [
    "BadRequest", "ConnectionFailed", "DataKey", "DataKeyCache", "DecryptionFailed", "Forbidden", "KeyNotUsable",
    "KeyvaultClient", "KeyvaultError", "NotFound", "PayloadTooLarge", "RateLimited", "ServerError", "Unauthorized",
    "Unavailable",
]
