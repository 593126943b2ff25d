"""How work reaches a worker: a small object the engine sends task names and ids through.

By default a task goes through the outbox: a row written in the current transaction (so
it exists exactly when the state change that decided it does), sent to Celery once the
transaction commits, and deleted when the broker took it. When the broker is down the row
stays, and the sweep (:meth:`Dispatcher.send_outbox`) sends it later: a broker outage delays a run,
it never strands it. Tests, benchmarks and ``rotation start --inline`` redirect tasks:
:meth:`Dispatcher.inline` drops what would be sent, and :meth:`Dispatcher.drive` runs it
here, in order. Tasks are named, not imported, so the engine does not depend on
``rotation.tasks`` (which depends on the engine).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timedelta

from django.db import DatabaseError, transaction
from django.utils import timezone

from rotation.models import OutboxMessage

log = logging.getLogger(__name__)

#: ``sink(name, args, options)``: where a redirected task goes instead of Celery.
Sink = Callable[[str, tuple, dict], None]

#: Celery names the tasks of ``rotation/tasks.py`` ``rotation.<name>``.
TASK_PREFIX = "rotation."
#: A message not sent this long after it was written is the sweep's to send (its writer
#: died between commit and send, or the broker refused it).
OUTBOX_GRACE = timedelta(seconds=5)
#: Longest wait between two tries of a message the broker keeps refusing.
OUTBOX_MAX_BACKOFF = timedelta(seconds=60)


def send_to_celery(name: str, args: tuple, options: dict) -> None:
    """Hand the task to Celery by name (in eager mode, run it here as Celery would)."""
    from celery import current_app

    task_name = TASK_PREFIX + name
    if current_app.conf.task_always_eager:
        current_app.loader.import_default_modules()  # autodiscovery registers rotation.tasks
        current_app.tasks[task_name].apply_async(args=args, **options)
    else:
        current_app.send_task(task_name, args=args, **options)


class Dispatcher:
    """Sends ``(name, args, options)`` to workers through the outbox after commit, unless redirected."""

    def __init__(self, send: Sink = send_to_celery):
        self._send = send
        self._sink: Sink | None = None

    def __call__(self, name: str, *args, **options) -> None:
        """Write the task to the outbox now; send it once the current transaction commits (redirected: at once)."""
        if self._sink is not None:
            self._sink(name, args, options)
            return
        options = {key: value for key, value in options.items() if value is not None}
        message = OutboxMessage.objects.create(task=name, args=list(args), options=options,
                                               next_attempt_at=timezone.now() + OUTBOX_GRACE)
        transaction.on_commit(lambda: self.deliver(message))

    def deliver(self, message: OutboxMessage) -> bool:
        """Send one outbox message and delete it; on failure it stays for the sweep. Returns whether it went."""
        try:
            (self._sink or self._send)(message.task, tuple(message.args), dict(message.options))
        except Exception as exc:  # any broker or connection error: the sweep sends it later
            log.warning("could not send %s%s yet (%s); the sweep retries it", message.task, tuple(message.args), exc)
            _note_failure(message, exc)
            return False
        with contextlib.suppress(DatabaseError):  # the database went away: it is sent once more later, harmlessly
            OutboxMessage.objects.filter(pk=message.pk).delete()
        return True

    def send_outbox(self, *, now: datetime | None = None, limit: int = 500) -> int:
        """Send the outbox messages whose time has come (the sweep); returns how many went.

        Stops at the first refusal: the broker is down, the rest wait for the next sweep.
        Rows are locked while they are sent (``SKIP LOCKED``), so two sweeps send each once.
        """
        now = now or timezone.now()
        sent = 0
        with transaction.atomic():
            due = list(OutboxMessage.objects.filter(next_attempt_at__lte=now).order_by("id")
                       .select_for_update(skip_locked=True)[:limit])
            for message in due:
                if not self.deliver(message):
                    break
                sent += 1
        return sent

    @contextlib.contextmanager
    def redirect(self, sink: Sink) -> Iterator[None]:
        previous, self._sink = self._sink, sink
        try:
            yield
        finally:
            self._sink = previous

    def inline(self) -> contextlib.AbstractContextManager[None]:
        """Within this block nothing is sent to Celery (use :meth:`drive` to do the work here)."""
        return self.redirect(lambda name, args, options: None)

    def drive(self, first: tuple[str, tuple], handlers: Mapping[str, Callable], *, max_tasks: int = 1000) -> int:
        """Run ``first`` and every task it sends, in order, in this process; returns how many ran."""
        queue: list[tuple[str, tuple]] = [first]
        ran = 0
        with self.redirect(lambda name, args, options: queue.append((name, args))):
            while queue and ran < max_tasks:
                name, args = queue.pop(0)
                handlers[name](*args)
                ran += 1
        return ran


def _note_failure(message: OutboxMessage, exc: Exception) -> None:
    attempts = message.attempts + 1
    wait = min(timedelta(seconds=2**attempts), OUTBOX_MAX_BACKOFF)
    with contextlib.suppress(DatabaseError):
        OutboxMessage.objects.filter(pk=message.pk).update(
            attempts=attempts, next_attempt_at=timezone.now() + wait, last_error=f"{type(exc).__name__}: {exc}"[:255],
        )


#: The dispatcher the engine uses; swap its sink with ``redirect``/``inline``/``drive``, never the object.
dispatcher = Dispatcher()

