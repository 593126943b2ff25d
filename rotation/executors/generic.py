"""Generic secrets: a new random value written as a new version; retirement deletes the old version.

Config (:attr:`GenericSecretExecutor.schema`): ``length`` (bytes of randomness, default 32),
``alphabet``: ``urlsafe`` (default) or ``hex``.
For values another system must accept (passwords, API keys), use a type-specific executor.
"""

from __future__ import annotations

import secrets

from rotation.executors.base import Context, Executor, VerificationFailed, fingerprint
from rotation.executors.schema import CHOICE, INTEGER, ConfigSchema, Field


class GenericSecretExecutor(Executor):
    schema = ConfigSchema((
        Field("length", INTEGER, "bytes of randomness in each new value", default=32, minimum=16, maximum=1024),
        Field("alphabet", CHOICE, "how the bytes are written: URL-safe base64 or hexadecimal", default="urlsafe",
              choices=("urlsafe", "hex")),
    ))

    def precheck(self, ctx: Context) -> None:
        current = ctx.read()
        ctx.state["previous_version"] = current.version
        ctx.tick("precheck.source", f"version {current.version} read from {ctx.secret.source}")

    def rotate(self, ctx: Context) -> None:
        if ctx.state.get("new_version"):
            return
        length = ctx.options["length"]
        value = secrets.token_hex(length) if ctx.options["alphabet"] == "hex" else secrets.token_urlsafe(length)
        written = ctx.write(value)
        ctx.state.update(new_version=written.version, new_value=fingerprint(value))
        ctx.tick("rotate.install", f"version {written.version} written ({fingerprint(value)})")

    def verify(self, ctx: Context) -> None:
        current = ctx.read()
        if current.version != ctx.state["new_version"] or fingerprint(current.value) != ctx.state["new_value"]:
            raise VerificationFailed("reading the secret back did not return the new value")
        ctx.tick("verify.read", f"version {current.version} reads back as written")

    def retire(self, ctx: Context) -> None:
        previous = ctx.state.get("previous_version")
        note = "previous version kept (the source cannot delete versions)"
        if previous and ctx.source().writable:
            ctx.source().delete_version(ctx.secret.path, previous)
            note = f"version {previous} deleted from {ctx.secret.source}"
        ctx.tick("retire", note)
