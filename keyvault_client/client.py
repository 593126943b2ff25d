"""``KeyvaultClient``: Keyvault's application API over httpx, with bytes in and out.

Calls that hit the client's rate limit (429) or a provider outage (503) are retried with
exponential backoff and full jitter, never sooner than the server's ``Retry-After``, until
``retries`` retries are spent or the next wait would end past ``deadline`` seconds from the
call's start; the last error is then raised. No other 4xx is retried: it would fail again.
"""

from __future__ import annotations

import base64
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from keyvault_client.cache import DataKeyCache
from keyvault_client.errors import ConnectionFailed, KeyvaultError, ServerError, error_from_problem

Context = Mapping[str, str]
#: The server's largest batch; longer inputs are sent in chunks of this size.
MAX_BATCH = 1000
RETRIED_STATUSES = frozenset({429, 503})


@dataclass(frozen=True)
class DataKey:
    """A data key from :meth:`KeyvaultClient.generate_data_key`; store ``id`` (and nothing else) to unwrap it later."""

    id: int
    plaintext: bytes = field(repr=False)
    ciphertext: bytes = field(repr=False)
    kek: str
    kek_version: int


def _b64(data: bytes) -> str:
    return base64.b64encode(bytes(data)).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def _plaintext(result: dict, sent: dict) -> bytes:
    return _unb64(result["plaintext"])


def _ciphertext(result: dict, sent: dict) -> bytes:
    return _unb64(result["ciphertext"])


def _context(context: Context | None) -> dict[str, str]:
    return dict(context or {})


def _chunks(items: Sequence, size: int = MAX_BATCH) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class KeyvaultClient:
    """A client of one Keyvault application API client (one bearer token).

    :param url: Keyvault's base URL (``https://keyvault.example``); ``/api/v1`` is added.
    :param token: the bearer token ``manage.py api client create`` printed.
    :param timeout: seconds per HTTP request.
    :param retries: retries of a 429 or 503 answer, at most.
    :param deadline: seconds a call may take, retries and waits included.
    :param cache: a :class:`~keyvault_client.cache.DataKeyCache` for unwrapped data keys, or ``None``.
    """

    def __init__(self, url: str, token: str, *, timeout: float = 10.0, retries: int = 5, deadline: float = 30.0,
                 cache: DataKeyCache | None = None, backoff: float = 0.1, max_backoff: float = 5.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self._http = httpx.Client(base_url=url.rstrip("/") + "/api/v1", timeout=timeout, transport=transport,
                                  headers={"Authorization": f"Bearer {token}", "Accept": "application/json"})
        self.timeout, self.retries, self.deadline = timeout, retries, deadline
        self.backoff, self.max_backoff = backoff, max_backoff
        self.cache = cache
        #: Retries made since this client was created (429 and 503 answers waited out).
        self.retried = 0

    def __repr__(self) -> str:
        return f"KeyvaultClient({str(self._http.base_url)!r}, retries={self.retries}, cache={self.cache!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> KeyvaultClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- transport -----------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: dict | None = None) -> Any:
        started = time.monotonic()
        attempt = 0
        while True:
            remaining = self.deadline - (time.monotonic() - started)
            try:
                response = self._http.request(method, path, json=body, timeout=max(0.1, min(self.timeout, remaining)))
            except httpx.HTTPError as exc:
                raise ConnectionFailed(f"{type(exc).__name__} talking to Keyvault", code="connection") from None
            if response.is_success:
                return response.json()
            error = self._error(response)
            if response.status_code not in RETRIED_STATUSES or attempt >= self.retries:
                raise error
            wait = self._wait(attempt, error.retry_after)
            if time.monotonic() - started + wait > self.deadline:
                raise error
            time.sleep(wait)
            attempt += 1
            self.retried += 1

    def _wait(self, attempt: int, retry_after: float | None) -> float:
        """Full jitter over an exponential ceiling, but never sooner than the server asked."""
        ceiling = min(self.max_backoff, self.backoff * 2**attempt)
        return max(retry_after or 0.0, random.uniform(0, ceiling))

    @staticmethod
    def _error(response: httpx.Response) -> KeyvaultError:
        retry_after = response.headers.get("Retry-After")
        try:
            seconds = float(retry_after) if retry_after is not None else None
        except ValueError:
            seconds = None
        try:
            problem = response.json()
        except ValueError:
            return ServerError(f"HTTP {response.status_code}", status=response.status_code, retry_after=seconds)
        return error_from_problem(problem, response.status_code, retry_after=seconds)

    def _batch(self, path: str, items: list[dict], convert: Callable[[dict, dict], Any]) -> list[Any]:
        """Results aligned with ``items``: ``convert(result, item sent)`` or the item's typed error."""
        results: list[Any] = []
        for chunk in _chunks(items):
            answer = self._request("POST", path, {"batch": list(chunk)})["batch"]
            results.extend(error_from_problem(result["error"]) if result.get("error") else convert(result, sent)
                           for result, sent in zip(answer, chunk, strict=True))
        return results

    # -- data keys -----------------------------------------------------------------------------

    def _data_key(self, item: dict, context: Context | None) -> DataKey:
        key = DataKey(id=item["id"], plaintext=_unb64(item["plaintext"]), ciphertext=_unb64(item["ciphertext"]),
                      kek=item["kek"], kek_version=item["kek_version"])
        if self.cache is not None:
            self.cache.put(key.id, context, key.plaintext)
        return key

    @staticmethod
    def _generate_body(context: Context | None, purpose: str | None, owner_ref: str | None) -> dict:
        return {"context": _context(context), "purpose": purpose or "", "owner_ref": owner_ref or ""}

    def generate_data_key(self, kek: str, context: Context | None = None, purpose: str | None = None,
                          owner_ref: str | None = None) -> DataKey:
        """A new data key under ``kek``, registered in Keyvault's inventory (so rotations rewrap it)."""
        item = self._request("POST", f"/keks/{kek}/data-keys", self._generate_body(context, purpose, owner_ref))
        return self._data_key(item, context)

    def generate_data_key_batch(self, kek: str, items: Sequence[Mapping[str, Any]]) -> list[DataKey | KeyvaultError]:
        """One data key per item (``{"context": …, "purpose": …, "owner_ref": …}``), aligned with ``items``."""
        bodies = [self._generate_body(i.get("context"), i.get("purpose"), i.get("owner_ref")) for i in items]
        return self._batch(f"/keks/{kek}/data-keys", bodies, lambda result, sent: self._data_key(result, sent["context"]))

    def unwrap(self, data_key_id: int, context: Context | None = None) -> bytes:
        """The data key's plaintext, from its current wrapping (the cache first, if there is one)."""
        cached = self.cache.get(data_key_id, context) if self.cache is not None else None
        if cached is not None:
            return cached
        plaintext = _unb64(self._request("POST", f"/data-keys/{int(data_key_id)}/unwrap",
                                         {"context": _context(context)})["plaintext"])
        if self.cache is not None:
            self.cache.put(data_key_id, context, plaintext)
        return plaintext

    def unwrap_batch(self, items: Sequence[tuple[int, Context | None]]) -> list[bytes | KeyvaultError]:
        """Plaintexts of ``(data key id, context)`` items, aligned with them; cached ones are not sent."""
        results: list[bytes | KeyvaultError | None] = [
            self.cache.get(key_id, context) if self.cache is not None else None for key_id, context in items]
        missing = [index for index, result in enumerate(results) if result is None]
        if missing:
            body = [{"id": int(items[i][0]), "context": _context(items[i][1])} for i in missing]
            for index, answer in zip(missing, self._batch("/data-keys/unwrap", body, _plaintext),
                                     strict=True):
                results[index] = answer
                if self.cache is not None and isinstance(answer, bytes):
                    self.cache.put(items[index][0], items[index][1], answer)
        return results  # type: ignore[return-value]

    def describe(self, data_key_id: int) -> dict[str, Any]:
        """The data key's metadata (KEK, version, purpose, owner, context keys, dates), never key material."""
        return self._request("GET", f"/data-keys/{int(data_key_id)}")

    def list_keks(self) -> list[dict[str, Any]]:
        """The KEKs this client may use: name, state, primary version, provider."""
        return self._request("GET", "/keks")["keks"]

    # -- envelope blobs ------------------------------------------------------------------------

    def encrypt(self, kek: str, plaintext: bytes, context: Context | None = None) -> bytes:
        """An envelope blob of ``plaintext`` (at most 4 KiB) under ``kek``."""
        body = {"plaintext": _b64(plaintext), "context": _context(context)}
        return _unb64(self._request("POST", f"/keks/{kek}/encrypt", body)["ciphertext"])

    def encrypt_batch(self, kek: str, items: Sequence[tuple[bytes, Context | None]]) -> list[bytes | KeyvaultError]:
        body = [{"plaintext": _b64(plaintext), "context": _context(context)} for plaintext, context in items]
        return self._batch(f"/keks/{kek}/encrypt", body, _ciphertext)

    def decrypt(self, ciphertext: bytes, context: Context | None = None) -> bytes:
        """The plaintext of an envelope blob (its KEK comes from the blob's header)."""
        body = {"ciphertext": _b64(ciphertext), "context": _context(context)}
        return _unb64(self._request("POST", "/decrypt", body)["plaintext"])

    def decrypt_batch(self, items: Sequence[tuple[bytes, Context | None]]) -> list[bytes | KeyvaultError]:
        body = [{"ciphertext": _b64(ciphertext), "context": _context(context)} for ciphertext, context in items]
        return self._batch("/decrypt", body, _plaintext)

    def rewrap(self, ciphertext: bytes, context: Context | None = None) -> bytes:
        """The blob moved to its KEK's primary version (same plaintext)."""
        body = {"ciphertext": _b64(ciphertext), "context": _context(context)}
        return _unb64(self._request("POST", "/rewrap", body)["ciphertext"])

    def rewrap_batch(self, items: Sequence[tuple[bytes, Context | None]]) -> list[bytes | KeyvaultError]:
        body = [{"ciphertext": _b64(ciphertext), "context": _context(context)} for ciphertext, context in items]
        return self._batch("/rewrap", body, _ciphertext)
