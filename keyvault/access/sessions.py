"""Database sessions that a copy of the database cannot use (``SESSION_ENGINE = "keyvault.access.sessions"``).

Django's database engine stores the cookie value itself as ``django_session``'s primary
key: whoever reads the table (a backup, a world-readable SQLite file, a read-only SQL
injection) can present any row as a ``sessionid`` cookie and be that user, second factor
included. Here the row is stored under ``HMAC(SECRET_KEY, cookie value)`` instead. The
server recomputes it on every request; the database never sees the cookie value, and a
stored id is not a cookie: presented as one, it is HMACed again and matches nothing.

Everything else is Django's database engine unchanged: expiry, ``flush()`` on logout,
``cycle_key()`` at login, ``clearsessions``. A row stored under a retired
``SECRET_KEY`` (listed in ``SECRET_KEY_FALLBACKS`` while a keyring rotation runs) is
found and re-keyed on its next use, the way ``Signer`` verifies with fallback keys;
once the old key is gone, its sessions end, as signed-cookie sessions do.
"""

from __future__ import annotations

from contextlib import contextmanager

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.sessions.backends import db
from django.utils.crypto import salted_hmac

#: ``django_session.session_key`` holds 40 characters: 160 bits of HMAC-SHA256, hex.
STORED_ID_LENGTH = 40
_SALT = "keyvault.sessions.stored_id"


def stored_id(session_key: str, *, secret: str | None = None) -> str:
    """The primary key a session is stored under: an HMAC of its cookie value, never the value."""
    digest = salted_hmac(_SALT, session_key, secret=secret or settings.SECRET_KEY, algorithm="sha256")
    return digest.hexdigest()[:STORED_ID_LENGTH]


class SessionStore(db.SessionStore):
    """Django's database session store, keyed by :func:`stored_id` of the session key."""

    def _get_session_from_db(self):
        if self.session_key is not None:
            self._rekey_from_fallback(self.session_key)
        with self._stored_key():
            return super()._get_session_from_db()

    async def _aget_session_from_db(self):
        if self.session_key is not None:
            await sync_to_async(self._rekey_from_fallback)(self.session_key)
        with self._stored_key():
            return await super()._aget_session_from_db()

    @contextmanager
    def _stored_key(self):
        """Django's reader looks rows up by ``self.session_key``: give it the stored id meanwhile."""
        original = self._session_key
        self._session_key = stored_id(original) if original else original
        try:
            yield
        finally:
            # The reader clears the key when nothing matches: keep that, else put the cookie value back.
            self._session_key = original if self._session_key is not None else None

    def _rekey_from_fallback(self, session_key: str) -> None:
        """Move a row stored under a fallback ``SECRET_KEY`` to the current key's id, its data re-signed."""
        fallbacks = [stored_id(session_key, secret=old) for old in settings.SECRET_KEY_FALLBACKS]
        if not fallbacks or self.model.objects.filter(session_key=stored_id(session_key)).exists():
            return
        old = self.model.objects.filter(session_key__in=fallbacks).first()
        if old is not None:
            # decode() verifies with the fallback keys too; encode() signs with the current one.
            self.model.objects.filter(session_key=old.session_key).update(
                session_key=stored_id(session_key), session_data=self.encode(self.decode(old.session_data)))

    def exists(self, session_key):
        return super().exists(stored_id(session_key))

    async def aexists(self, session_key):
        return await super().aexists(stored_id(session_key))

    def create_model_instance(self, data):
        instance = super().create_model_instance(data)
        instance.session_key = stored_id(instance.session_key)
        return instance

    async def acreate_model_instance(self, data):
        instance = await super().acreate_model_instance(data)
        instance.session_key = stored_id(instance.session_key)
        return instance

    def delete(self, session_key=None):
        session_key = session_key or self.session_key
        if session_key is not None:
            super().delete(stored_id(session_key))

    async def adelete(self, session_key=None):
        session_key = session_key or self.session_key
        if session_key is not None:
            await super().adelete(stored_id(session_key))
