"""Typed errors of the Keyvault application API: one class per RFC 9457 problem family.

The server answers every failure as ``application/problem+json`` whose ``type`` is
``urn:keyvault:api:problem:<code>``; :func:`error_from_problem` maps the code (or, for a
code this client does not know yet, the status) to a class here. No error carries key
material: the server never puts any in a problem, and this module only copies its
``type``, ``title``, ``status`` and ``detail``.
"""

from __future__ import annotations

from typing import Any

PROBLEM_BASE = "urn:keyvault:api:problem:"


class KeyvaultError(Exception):
    """A failed call (or one failed item of a batch)."""

    status: int | None = None

    def __init__(self, message: str = "", *, code: str = "", status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message or code or type(self).__name__)
        self.code = code
        if status is not None:
            self.status = status
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, status={self.status!r}, message={str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return (type(self) is type(other) and self.code == other.code  # type: ignore[attr-defined]
                and self.status == other.status and str(self) == str(other))  # type: ignore[attr-defined]

    __hash__ = Exception.__hash__


class BadRequest(KeyvaultError):
    """400: the request (or the item) is malformed: invalid JSON, base64 or encryption context."""

    status = 400


class DecryptionFailed(KeyvaultError):
    """400: the ciphertext could not be opened (wrong context, tampered or foreign blob) — deliberately opaque."""

    status = 400


class Unauthorized(KeyvaultError):
    """401: no, unknown, expired or revoked token, or a revoked or expired client."""

    status = 401


class Forbidden(KeyvaultError):
    """403: an operation, encryption context or source address this client may not use."""

    status = 403


class NotFound(KeyvaultError):
    """404: no such KEK or data key, or one that is not this client's (indistinguishable on purpose)."""

    status = 404


class KeyNotUsable(KeyvaultError):
    """409: the KEK exists but is disabled or otherwise not usable now."""

    status = 409


class PayloadTooLarge(KeyvaultError):
    """413: the body or an item of it is too large (encrypt takes at most 4 KiB)."""

    status = 413


class RateLimited(KeyvaultError):
    """429: over the client's rate limit, still so when the retry deadline ran out."""

    status = 429


class Unavailable(KeyvaultError):
    """503: the key provider is down, still so when the retry deadline ran out."""

    status = 503


class ServerError(KeyvaultError):
    """Any other answer: a 5xx other than 503, or a body that is not a problem."""


class ConnectionFailed(KeyvaultError):
    """No answer at all: refused connection, timeout, TLS failure. Not retried: the call may have happened."""


CODES: dict[str, type[KeyvaultError]] = {
    "unauthorized": Unauthorized,
    "forbidden-address": Forbidden,
    "forbidden-operation": Forbidden,
    "forbidden-context": Forbidden,
    "not-found": NotFound,
    "invalid-request": BadRequest,
    "invalid-base64": BadRequest,
    "invalid-context": BadRequest,
    "decryption-failed": DecryptionFailed,
    "key-not-usable": KeyNotUsable,
    "payload-too-large": PayloadTooLarge,
    "rate-limited": RateLimited,
    "provider-unavailable": Unavailable,
}

STATUSES: dict[int, type[KeyvaultError]] = {
    400: BadRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: KeyNotUsable,
    413: PayloadTooLarge, 429: RateLimited, 503: Unavailable,
}


def error_from_problem(problem: Any, status: int | None = None, *, retry_after: float | None = None) -> KeyvaultError:
    """The typed error for a problem-details body (a whole answer's, or one batch item's ``error``)."""
    problem = problem if isinstance(problem, dict) else {}
    kind = str(problem.get("type", ""))
    code = kind.removeprefix(PROBLEM_BASE) if kind.startswith(PROBLEM_BASE) else ""
    status = problem.get("status", status) if isinstance(problem.get("status", status), int) else status
    cls = CODES.get(code) or STATUSES.get(status or 0) or ServerError
    message = str(problem.get("detail") or problem.get("title") or f"HTTP {status}")[:300]
    return cls(message, code=code, status=status, retry_after=retry_after)
