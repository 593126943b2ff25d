"""The driver contract: what one kind of target does in each phase of a run.

The engine (``rotation.engine``) owns runs, states, approvals, steps, dispatch and the
audit of all of them; a driver knows its target — a KEK to rotate, a KEK to migrate,
a managed secret — and nothing of the engine but the :class:`Hooks` it is lent.
Adding a kind of target is one driver module, one runbook and a test.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from keyvault.audit import Actor
from rotation.exceptions import InvalidRunTransition
from rotation.models import RotationPolicy, RotationRun


@dataclass(frozen=True)
class Hooks:
    """The engine's callables a driver may use; every one of them checks, writes and audits."""

    #: The engine's own audit actor.
    actor: Actor
    #: ``locked(run_id) -> run``: the run with its row locked (inside a transaction).
    locked: Callable[[int], RotationRun]
    #: ``transition(run, new_state, *, actor, note="", **fields) -> run``: move a locked run by the driver's table.
    transition: Callable[..., RotationRun]
    #: ``allows(from_state, to_state) -> bool``: whether the driver's table has that move.
    allows: Callable[[str, str], bool]
    #: ``tick(run, key, *, actor, evidence="", status=DONE)``: a runbook step is done (or failed).
    tick: Callable[..., None]
    #: ``dispatch(task_name, *args, **options)``: hand work to a worker after commit.
    dispatch: Callable[..., None]
    #: ``fan_out(run, driver) -> partitions``: send what is left to rewrap, in id ranges.
    fan_out: Callable[[RotationRun, Driver], int]
    #: ``finish_rewrap(run_id, driver) -> state``: move on from rewrapping if nothing is left.
    finish_rewrap: Callable[[int, Driver], str]


class Driver(abc.ABC):
    """One kind of rotation target."""

    #: ``"kek"`` or ``"secret"``: the permissions a person needs to start a run of it.
    target_kind: str = ""
    #: Whether runs rewrap data keys (queued → rotating → rewrapping → verifying …); the
    #: engine picks the transition table by it.
    rewraps: bool = False
    #: Errors that leave the run where it is for the task to retry with backoff.
    transient: tuple[type[BaseException], ...] = ()

    def __init__(self, hooks: Hooks):
        self.hooks = hooks

    # -- starting ------------------------------------------------------------------------
    @abc.abstractmethod
    def check_start(self, target: Any, *, kind: str, destination: Any) -> None:
        """Refuse a run this target cannot have. :raises RotationError:"""

    @abc.abstractmethod
    def runbook_name(self, target: Any) -> str:
        """The runbook (``rotation/runbooks/<name>-<kind>.md``) whose steps a run of it ticks."""

    @abc.abstractmethod
    def label(self, target: Any) -> str:
        """What the target is, for people (``KEK payments``, ``TLS certificate``)."""

    @abc.abstractmethod
    def policy_defaults(self, target: Any) -> dict:
        """Fields of a new :class:`RotationPolicy` for ``target`` (period, next due, grace …)."""

    def lock(self, target: Any) -> None:
        """Lock what a concurrent change of the target holds while a run starts (inside the transaction)."""

    def run_fields(self, target: Any, destination: Any) -> dict:
        """The run's target columns."""
        return {self.target_kind: target}

    def needs_approval(self, target: Any, policy: RotationPolicy) -> bool:
        return policy.approvals_required > 0

    def started_details(self, run: RotationRun, *, runbook, destination: Any) -> dict:
        """Driver-specific fields of the ``rotation.started`` audit event: keywords of ``events.rotation_started``."""
        return {}

    def approvals_required(self, run: RotationRun) -> int:
        """Approvals ``run`` needs before it is queued: its policy's."""
        return run.policy.approvals_required if run.policy_id else 0

    def check_approver(self, run: RotationRun, user) -> None:
        """Refuse an approver beyond the engine's rules (initiator, once each). :raises ApprovalRefused:"""

    # -- policy ----------------------------------------------------------------------------
    def reschedule(self, target: Any, policy: RotationPolicy, changes: dict) -> None:
        """Set ``policy.next_due_at`` after ``changes`` (before it is saved)."""

    def policy_saved(self, target: Any, policy: RotationPolicy, *, actor: Actor) -> None:
        """Bring the target in line with its changed policy (through the target's own services)."""

    # -- people ----------------------------------------------------------------------------
    def before_manual_tick(self, run: RotationRun, key: str, *, now: datetime) -> RotationRun:
        """Refuse a manual tick that would break a rule; returns the run. :raises RotationError:"""
        return run

    def after_manual_tick(self, run: RotationRun) -> None:
        """Wake the run if it was waiting for that step."""

    def accept_value(self, run: RotationRun, value: str, *, actor: Actor) -> None:
        """Take a value a person hands over for a locked run. :raises InvalidRunTransition:"""
        raise InvalidRunTransition(f"run #{run.pk} is not waiting for a new secret value")

    # -- working -------------------------------------------------------------------------
    @abc.abstractmethod
    def advance(self, run: RotationRun, now: datetime) -> str:
        """Do the work of the run's current phase (and of the following ones it can); returns the state.

        Idempotent: every phase checks where the run is first. A transient error
        (:attr:`transient`) is re-raised; any other error fails the run (:meth:`fail`).
        """

    @abc.abstractmethod
    def fail(self, run_id: int, exc: Exception) -> str:
        """Record the run as failed after ``exc`` (the old key or credential still works)."""

    @abc.abstractmethod
    def rollback(self, run: RotationRun, reason: str) -> str:
        """Undo a locked run's switch before retirement; returns the note for the audit trail."""
