"""The rotation services: the public face of ``rotation.engine`` and ``rotation.managed_secrets``.

Celery tasks (``rotation/tasks.py``), admin views and the ``rotation`` command are thin
callers of these functions. The engine lives in :mod:`rotation.engine` — states, runs,
sweep, rewrap, dispatch and one driver per kind of target (KEK rotation, provider
migration, managed secrets); this module only names what the rest of the project uses.
"""

from __future__ import annotations

from keyvault.audit import Actor
from keyvault.models import KeyEncryptionKey, ManagedSecret
from rotation.engine.dispatch import dispatcher
from rotation.engine.drivers.secret import repointed_event
from rotation.engine.policies import POLICY_FIELDS, create_kek_with_policy, ensure_policy, policy_of
from rotation.engine.ratelimit import RateStatus
from rotation.engine.leases import overview as partition_overview
from rotation.engine.ratelimit import for_run as rate_limits_for_run
from rotation.engine.ratelimit import set_cap as set_rate_limit
from rotation.engine.ratelimit import status as rate_limit_status
from rotation.engine.policies import update_policy as _update_policy
from rotation.engine.rewrap import DEFAULT_PARTITIONS
from rotation.engine.runs import (
    approvals_required, cancel, decide, drive, enqueue_run, execute_run, fan_out, inline_dispatch, is_break_glass,
    mark_paused, note_pause, provide_secret_value, require_run_permission, resume, rewrap_batch, rewrap_partition, rollback,
    start_run, tick_manual_step,
)
from rotation.engine.states import ENGINE, SECRET_TRANSITIONS, TERMINAL, TRANSITIONS
from rotation.engine.states import people_actions, tick
from rotation.engine.wiring import driver_for
from rotation.engine.recovery import recover, resume_stalled_runs
from rotation.engine.sweep import (
    dispatch_due_rotations, due_policies, flag_expiring_secrets, secrets_needing_attention, start_due_secret_rotations,
)
from rotation.managed_secrets import (
    POINTER_FIELDS, SECRET_FIELDS, check_secret_change, check_secret_config, check_secret_references,
    ensure_secret_policy, invalid_secret_configs, refresh_secret, register_secret, update_secret, update_secret_policy,
)
from rotation.models import RotationPolicy, RotationRun


def update_policy(kek: KeyEncryptionKey, *, actor: Actor, **changes) -> RotationPolicy:
    """Change a KEK's rotation policy (its schedule: period, next due date) and the usage limit that follows it."""
    return _update_policy(kek, actor=actor, **changes)


def run_actions(run: RotationRun) -> frozenset[str]:
    """What a person may do to ``run`` now (approve, cancel, roll back, resume), from its driver's state table."""
    return people_actions(run.state, rewraps=driver_for(run).rewraps)


def dispatch(name: str, *args, **options) -> None:
    """Send a task once the current transaction commits (inline mode: queue it at once)."""
    dispatcher(name, *args, **options)


__all__ = [
    "DEFAULT_PARTITIONS", "ENGINE", "ManagedSecret", "POINTER_FIELDS", "POLICY_FIELDS", "RateStatus", "SECRET_FIELDS",
    "SECRET_TRANSITIONS",
    "TERMINAL", "TRANSITIONS", "approvals_required", "cancel", "check_secret_change", "check_secret_config",
    "check_secret_references",
    "create_kek_with_policy", "decide", "dispatch", "dispatch_due_rotations", "drive", "due_policies", "enqueue_run", "ensure_policy",
    "ensure_secret_policy", "execute_run", "fan_out", "flag_expiring_secrets", "inline_dispatch", "invalid_secret_configs",
    "is_break_glass",
    "mark_paused", "note_pause", "partition_overview", "policy_of", "provide_secret_value", "rate_limit_status", "rate_limits_for_run",
    "recover", "refresh_secret", "register_secret", "repointed_event", "set_rate_limit",
    "require_run_permission", "resume", "run_actions", "resume_stalled_runs", "rewrap_batch", "rewrap_partition", "rollback",
    "secrets_needing_attention", "start_due_secret_rotations", "start_run", "tick", "tick_manual_step",
    "update_policy", "update_secret", "update_secret_policy",
]
