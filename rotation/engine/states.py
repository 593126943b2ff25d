"""The run state machine: the transition tables and the one function that moves a run.

Progress lives in the database, never in task memory, so every move takes the run's
row lock (:func:`locked_run`) and checks the table before it writes and audits.
"""

from __future__ import annotations

from django.utils import timezone

from keyvault.audit import Actor, events
from rotation.exceptions import InvalidRunTransition
from rotation.models import RotationRun, RunStep

S = RotationRun.State

#: Who the engine acts as in the audit trail.
ENGINE = Actor.system("rotation-engine")

#: Runs that rewrap data keys (KEK rotation, provider migration).
TRANSITIONS: dict[str, set[str]] = {
    S.PENDING_APPROVAL: {S.QUEUED, S.CANCELLED},
    S.QUEUED: {S.ROTATING, S.REWRAPPING, S.CANCELLED, S.FAILED},
    S.ROTATING: {S.REWRAPPING, S.FAILED},
    S.REWRAPPING: {S.VERIFYING, S.FAILED, S.ROLLED_BACK},
    S.VERIFYING: {S.RETIRING, S.REWRAPPING, S.FAILED, S.ROLLED_BACK},
    S.RETIRING: {S.COMPLETED, S.FAILED, S.ROLLED_BACK},
    S.FAILED: {S.QUEUED, S.ROLLED_BACK, S.CANCELLED},
    S.COMPLETED: set(),
    S.CANCELLED: set(),
    S.ROLLED_BACK: set(),
}
#: Runs with no rewrap (managed secrets): rotating → verifying directly; a run waiting for a person can be rolled back.
SECRET_TRANSITIONS: dict[str, set[str]] = {
    S.PENDING_APPROVAL: {S.QUEUED, S.CANCELLED},
    S.QUEUED: {S.ROTATING, S.CANCELLED, S.FAILED},
    S.ROTATING: {S.VERIFYING, S.FAILED, S.ROLLED_BACK},
    S.VERIFYING: {S.RETIRING, S.FAILED, S.ROLLED_BACK},
    S.RETIRING: {S.COMPLETED, S.FAILED, S.ROLLED_BACK},
    S.FAILED: {S.QUEUED, S.ROLLED_BACK, S.CANCELLED},
    S.COMPLETED: set(),
    S.CANCELLED: set(),
    S.ROLLED_BACK: set(),
}
TERMINAL = {S.COMPLETED, S.CANCELLED, S.ROLLED_BACK}
#: States in which a worker has something to do.
WORKING = (S.QUEUED, S.ROTATING, S.REWRAPPING, S.VERIFYING, S.RETIRING)


def table(*, rewraps: bool) -> dict[str, set[str]]:
    """The transition table of a driver that rewraps data keys, or of one that does not."""
    return TRANSITIONS if rewraps else SECRET_TRANSITIONS


#: What a person can do to a run, by the state each action moves it to. ``approve`` and
#: ``resume`` both queue a run: approval from *pending approval*, resume from *failed*.
PEOPLE_ACTIONS = ("approve", "cancel", "rollback", "resume")


def people_actions(state: str, *, rewraps: bool) -> frozenset[str]:
    """The actions the transition table allows a person from ``state`` (the console offers only these).

    Derived from the table itself, so the run page and the services that refuse a move
    cannot disagree about which moves exist.
    """
    allowed = table(rewraps=rewraps)[state]
    actions = set()
    if S.QUEUED in allowed:
        actions.add("approve" if state == S.PENDING_APPROVAL else "resume")
    if S.CANCELLED in allowed:
        actions.add("cancel")
    if S.ROLLED_BACK in allowed:
        actions.add("rollback")
    return frozenset(actions)


def locked_run(run_id: int) -> RotationRun:
    """The run, its row locked until the transaction ends."""
    return RotationRun.objects.select_for_update(of=("self",)).select_related("kek", "secret", "policy").get(pk=run_id)


def transition(
    run: RotationRun, new_state: str, *, table: dict[str, set[str]], actor: Actor, note: str = "", **fields,
) -> RotationRun:
    """Move a locked run to ``new_state`` (the one place transitions are checked) and audit it."""
    if new_state not in table[run.state]:
        raise InvalidRunTransition(
            f"run #{run.pk} is {run.get_state_display().lower()}; it cannot become {S(new_state).label.lower()}"
        )
    previous = run.state
    run.state = new_state
    # A run that moves is no longer paused (a transition may say otherwise); a run just queued
    # counts from now, so the sweep does not take a long approval for a lost worker.
    fields = {"paused_reason": "", "next_attempt_at": None, **fields}
    if new_state == S.QUEUED:
        fields.setdefault("heartbeat_at", timezone.now())
    for name, value in fields.items():
        setattr(run, name, value)
    if new_state in TERMINAL or new_state == S.FAILED:
        run.finished_at = timezone.now()
    run.save()
    events.run_state_changed(run.target, actor=actor, run_id=run.pk, from_state=previous, to_state=new_state,
                             note=note, failed=new_state == S.FAILED)
    return run


def tick(run: RotationRun, key: str, *, actor: Actor, evidence: str = "", status: str = RunStep.Status.DONE) -> None:
    """Mark a runbook step of the run done (or skipped/failed), recording who, when and evidence."""
    updated = RunStep.objects.filter(run=run, key=key).exclude(status=status).update(
        status=status, done_by=actor.name, done_at=timezone.now(), evidence=evidence[:4000]
    )
    if updated:
        events.run_step_ticked(run.target, actor=actor, run_id=run.pk, step=key, status=status)
