"""One process's concurrent audit appends made as one statement: a leader appends what followers queued.

A web process serves several requests at once (gunicorn ``gthread``: ``HMD_WEB_THREADS``).
An API call outside any transaction used to append its event in a statement of its own, so
with four threads per process four statements queued for the chain head, each locking it,
inserting one row and committing. :class:`AppendBatcher` makes them one: the first caller
to arrive leads, takes every event queued so far (its own first) and appends them with one
call of the append function; callers that arrive meanwhile queue, and the first of them
leads the next round when the leader is done. Nobody waits on a timer: a lone caller
appends at once, as before.

The guarantees of a single append hold per caller:

- no event, no success: a caller returns only once the statement holding its event has
  committed, and raises if that statement failed (then none of the round's events exist,
  and every caller in it raises; their calls fail as one whose event cannot be written);
- exactly one event per call: each queued event is taken by exactly one round;
- the chain stays verifiable: the round is one ordinary append (the head locked, the events
  sequenced in queue order).

Each caller encodes its own events before queuing (:data:`Encoded`), so one caller's
unserialisable event fails that caller alone, and the leader's round does only the append.
Nothing here imports Django; the append function carries the database work.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Sequence
from typing import Any

#: What a caller queues: its events as the append function takes them (already encoded).
Encoded = Sequence[Any]


class _Entry:
    __slots__ = ("encoded", "ready", "lead", "result", "error")

    def __init__(self, encoded: Encoded):
        self.encoded = encoded
        self.ready = threading.Event()  # set when the entry is appended, failed, or told to lead
        self.lead = False
        self.result: list | None = None
        self.error: BaseException | None = None


class AppendBatcher:
    """Appends of concurrent callers in one process, one call of ``append`` per round.

    :param append: takes the encoded events of a round, in order, and returns one result
        per event (in order), or raises; it runs on the leading caller's thread, so it may
        use that thread's database connection.
    """

    def __init__(self, append: Callable[[list], list]):
        self._append = append
        self._lock = threading.Lock()
        self._queue: list[_Entry] = []
        self._leading = False
        #: rounds appended and the events in them (what tests check the grouping by)
        self.rounds = 0
        self.events = 0

    def submit(self, encoded: Encoded) -> list:
        """Append ``encoded`` (in a round with whatever else is queued); its results, once committed."""
        entry = _Entry(encoded)
        with self._lock:
            self._queue.append(entry)
            leads = not self._leading
            self._leading = True
        if not leads:
            entry.ready.wait()
        if leads or entry.lead:
            self._lead()
        if entry.error is not None:
            raise entry.error
        return entry.result

    def _lead(self) -> None:
        with self._lock:
            batch, self._queue = self._queue, []
        try:
            results = self._append([item for entry in batch for item in entry.encoded])
            if len(results) != sum(len(entry.encoded) for entry in batch):
                raise RuntimeError("the audit append returned a result count unlike the events given")
        except BaseException as exc:  # every caller of the round fails as the statement did
            for number, entry in enumerate(batch):
                entry.error = exc if number == 0 else _copy(exc)
                entry.ready.set()
        else:
            start = 0
            for entry in batch:
                entry.result = results[start:start + len(entry.encoded)]
                start += len(entry.encoded)
                entry.ready.set()
            self.rounds += 1
            self.events += start
        finally:
            with self._lock:
                if self._queue:  # arrived during this round: the first of them leads the next
                    following = self._queue[0]
                    following.lead = True
                    following.ready.set()
                else:
                    self._leading = False


def _copy(exc: BaseException) -> BaseException:
    """The round's error for one more caller: its own instance, so tracebacks do not mix across threads."""
    try:
        duplicate = copy.copy(exc)
    except Exception:
        return exc
    duplicate.__cause__ = exc.__cause__
    return duplicate
