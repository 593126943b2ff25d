"""How work reaches a worker: a small object the engine sends task names and ids through.

By default a task goes to Celery once the current transaction commits (a worker must
never see a run before its state is saved). Tests, benchmarks and ``rotation start
--inline`` redirect it: :meth:`Dispatcher.inline` drops what would be sent, and
:meth:`Dispatcher.drive` runs it here, in order. Tasks are named, not imported, so the
engine does not depend on ``rotation.tasks`` (which depends on the engine).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

from django.db import transaction

#: ``sink(name, args, options)``: where a redirected task goes instead of Celery.
Sink = Callable[[str, tuple, dict], None]

#: Celery names the tasks of ``rotation/tasks.py`` ``rotation.<name>``.
TASK_PREFIX = "rotation."


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
    """Sends ``(name, args, options)`` to workers after commit, unless redirected."""

    def __init__(self, send: Sink = send_to_celery):
        self._send = send
        self._sink: Sink | None = None

    def __call__(self, name: str, *args, **options) -> None:
        """Send a task once the current transaction commits (redirected: at once)."""
        if self._sink is not None:
            self._sink(name, args, options)
            return
        transaction.on_commit(lambda: self._send(name, args, options))

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


#: The dispatcher the engine uses; swap its sink with ``redirect``/``inline``/``drive``, never the object.
dispatcher = Dispatcher()
