"""Which driver runs a target, and the engine callables it is lent (:class:`Hooks`, bound to its table)."""

from __future__ import annotations

import functools

from keyvault.models import ManagedSecret
from rotation.engine import rewrap, states
from rotation.engine.dispatch import dispatcher
from rotation.engine.drivers import Driver, Hooks, driver_class
from rotation.models import RotationRun


@functools.cache
def hooks(*, rewraps: bool) -> Hooks:
    """What a driver may call, its transitions checked against the table for its kind of run."""
    table = states.table(rewraps=rewraps)
    return Hooks(
        actor=states.ENGINE,
        locked=states.locked_run,
        transition=functools.partial(states.transition, table=table),
        allows=lambda from_state, to_state: to_state in table[from_state],
        tick=states.tick,
        dispatch=dispatcher,
        fan_out=rewrap.fan_out,
        finish_rewrap=rewrap.finish_if_done,
    )


def _make(cls: type[Driver]) -> Driver:
    return cls(hooks(rewraps=cls.rewraps))


def driver_for(run: RotationRun) -> Driver:
    """The driver of an existing run."""
    return _make(driver_class(secret=bool(run.secret_id), kind=run.kind))


def driver_for_target(target, *, kind: str = RotationRun.Kind.ON_DEMAND) -> Driver:
    """The driver that would run a ``kind`` run of ``target`` (a KEK or a managed secret)."""
    return _make(driver_class(secret=isinstance(target, ManagedSecret), kind=kind))


def transition(run: RotationRun, new_state: str, **fields) -> RotationRun:
    """Move a locked run by its driver's table (see :func:`rotation.engine.states.transition`)."""
    return driver_for(run).hooks.transition(run, new_state, **fields)
