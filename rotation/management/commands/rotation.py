"""``manage.py rotation <subcommand>`` — start, watch, approve and stop rotation runs.

The same services, approval rules and audit events as the console.
"""

from __future__ import annotations

import contextlib
import json
import time

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import CommandError

from keyvault.management.commands._base import KeyvaultCommand
from keyvault.management.commands.kms import kek_named
from keyvault.keys import services as key_services
from rotation import services
from keyvault.models import ManagedSecret
from rotation.models import RotationRun, format_period, parse_period

S = RotationRun.State
WAIT_DONE = {S.COMPLETED, S.RETIRING}
WAIT_FAILED = {S.FAILED, S.CANCELLED, S.ROLLED_BACK}


def secret_named(name: str) -> ManagedSecret:
    secret = ManagedSecret.objects.filter(name=name).first()
    if secret is None:
        raise CommandError(f"no managed secret named {name!r}")
    return secret


def run_numbered(run_id: int) -> RotationRun:
    run = RotationRun.objects.select_related("kek", "secret", "policy").filter(pk=run_id).first()
    if run is None:
        raise CommandError(f"no rotation run #{run_id}")
    return run


def run_summary(run: RotationRun) -> dict:
    coverage = key_services.version_coverage(run.kek) if run.kek_id else {}
    return {
        "id": run.pk,
        "kek": run.kek.name if run.kek_id else None,
        "secret": run.secret.name if run.secret_id else None,
        "kind": run.kind,
        "state": run.state,
        "initiator": run.initiator,
        "reason": run.reason,
        "incident_ref": run.incident_ref,
        "previous_version": run.previous_version,
        "target_version": run.target_version,
        "total": run.total_deks,
        "rewrapped": run.rewrapped,
        "failed": run.failed_deks,
        "remaining": run.remaining,
        "percent": run.percent,
        "coverage": {str(k): v for k, v in sorted(coverage.items())},
        "retire_after": run.retire_after.isoformat() if run.retire_after else None,
        "paused_reason": run.paused_reason,
        "last_error": run.last_error,
        "rate_limits": [limit.as_dict() for limit in services.rate_limits_for_run(run)],
        "partitions": services.partition_overview(run.pk).as_dict(),
        "approvals": [
            {"approver": a.approver.get_username(), "decision": a.decision, "break_glass": a.break_glass}
            for a in run.approvals.select_related("approver")
        ],
        "steps": [
            {"key": s.key, "section": s.section, "status": s.status, "automatic": s.automatic, "done_by": s.done_by}
            for s in run.steps.all()
        ],
    }


class Command(KeyvaultCommand):
    help = "Start, follow, approve, cancel and roll back rotation runs."

    def add_arguments(self, parser):
        super().add_arguments(parser)
        sub = parser.add_subparsers(dest="subcommand", required=True)

        start = sub.add_parser("start", help="Start a rotation of a KEK or a managed secret; prints "
                               "'run #ID started (TARGET, KIND)'.")
        target = start.add_mutually_exclusive_group(required=True)
        target.add_argument("--kek")
        target.add_argument("--secret", help="Name of a managed secret (cookie keys, DB credential, TLS, OAuth).")
        start.add_argument("--kind", default="on_demand", choices=[k.value for k in RotationRun.Kind])
        start.add_argument("--reason", default="")
        start.add_argument("--incident", default="", help="Incident or ticket reference (required for emergency).")
        start.add_argument("--destination", help="Destination KEK (for --kind migrate).")
        start.add_argument("--wait", action="store_true",
                           help="Follow progress on stderr; exit 0 once everything is rewrapped and verified.")
        start.add_argument("--id-only", action="store_true",
                           help="Print only the run id, for scripts: run=$(python manage.py rotation start ... --id-only).")
        start.add_argument("--inline", action="store_true",
                           help="Do the work in this process instead of on Celery workers (one-shot jobs).")

        status = sub.add_parser("status", help="State, counters and coverage of a run.")
        status.add_argument("run_id", type=int)
        status.add_argument("--json", action="store_true")

        listing = sub.add_parser("list", help="Recent runs.")
        listing.add_argument("--active", action="store_true")
        listing.add_argument("--limit", type=int, default=20)

        approve = sub.add_parser("approve", help="Approve (or --reject) a run, as --user.")
        approve.add_argument("run_id", type=int)
        approve.add_argument("--comment", required=True)
        approve.add_argument("--reject", action="store_true")
        approve.add_argument("--break-glass", action="store_true", help="Bypass missing approvals (break-glass group).")

        for name, text in (("cancel", "Cancel a run that has not started rotating."),
                           ("rollback", "Roll back a run before its old versions are retired."),
                           ("resume", "Requeue a failed run.")):
            p = sub.add_parser(name, help=text)
            p.add_argument("run_id", type=int)
            p.add_argument("--reason", default="")

        tick = sub.add_parser("tick", help="Confirm a manual runbook step of a run.")
        tick.add_argument("run_id", type=int)
        tick.add_argument("step")
        tick.add_argument("--evidence", default="")

        wait = sub.add_parser("wait", help="Follow a run on stderr; exit 0 once it is rewrapped and verified.")
        wait.add_argument("run_id", type=int)

        work = sub.add_parser("work", help="Advance a run in this process until it is done or waiting.")
        work.add_argument("run_id", type=int)

        policy = sub.add_parser("policy", help="Show or change a KEK's rotation policy.")
        policy.add_argument("--kek", required=True)
        policy.add_argument("--period", help="e.g. 90d, 12h, 5m")
        policy.add_argument("--grace", help="Grace period before old versions are disabled, e.g. 7d, 0s")
        policy.add_argument("--approvals", type=int, choices=[0, 1, 2])
        policy.add_argument("--usage-threshold", type=int)
        policy.add_argument("--auto", dest="auto", action="store_true", default=None)
        policy.add_argument("--manual", dest="auto", action="store_false")

        sub.add_parser("sweep", help="Run the beat sweep once now (what Celery beat does every minute).")

        limit = sub.add_parser("rate-limit", help="Show or change rotation's cap on calls per second at a provider.")
        limit.add_argument("--provider", help="Provider name (aws, gcp, vault …); default: every configured one.")
        change = limit.add_mutually_exclusive_group()
        change.add_argument("--cap", type=int, help="Calls per second, all workers together; 0: no cap.")
        change.add_argument("--default", action="store_true", help="Back to the HMD_ROTATION_RATE_LIMITS default.")

    def handle(self, *args, subcommand, **options):
        return getattr(self, "_" + subcommand.replace("-", "_"))(options)

    def _user(self, options):
        username = options.get("user")
        if not username:
            return None
        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            raise CommandError(f"no such user: {username}")
        return user

    def _start(self, options):
        destination = kek_named(options["destination"]) if options["destination"] else None
        keep_here = services.inline_dispatch() if options["inline"] else contextlib.nullcontext()
        with keep_here:
            target = {"secret": secret_named(options["secret"])} if options["secret"] else {"kek": kek_named(options["kek"])}
            run = services.start_run(
                **target, actor=self.actor(options), user=self._user(options),
                kind=options["kind"], reason=options["reason"], incident_ref=options["incident"],
                destination=destination,
            )
        if options["id_only"]:
            self.stdout.write(str(run.pk))
        else:
            self.stdout.write(f"run #{run.pk} started ({run.target_label}, {run.get_kind_display().lower()})")
        self.stdout.flush()
        self._warn_revocation_gap(run)
        if options["inline"]:
            run = services.drive(run.pk)
        if options["wait"] or options["inline"]:
            self._follow(run.pk)

    def _follow(self, run_id: int) -> None:
        last = None
        while True:
            run = run_numbered(run_id)
            line = f"run #{run.pk}: {run.get_state_display().lower()} {run.rewrapped}/{run.total_deks} ({run.percent}%)"
            if run.paused_reason:
                line += f" — paused: {run.paused_reason}"
            if line != last:
                self.stderr.write(line)
                last = line
            if run.secret_id and run.paused_reason.startswith("waiting for a person"):
                return  # a guided secret rotation: the run page / `rotation tick` continue it
            if run.state in WAIT_DONE:
                if run.state == S.RETIRING and run.retire_after and run.secret_id:
                    self.stderr.write(f"new credential installed and verified; the old one retires after "
                                      f"{run.retire_after:%Y-%m-%d %H:%M} UTC (`rotation work {run.pk}` then)")
                elif run.state == S.RETIRING and run.retire_after:
                    self.stderr.write(f"all data keys rewrapped and verified; old versions retire after {run.retire_after:%Y-%m-%d %H:%M} UTC")
                if run.state == S.COMPLETED:
                    self._warn_revocation_gap(run)
                return
            if run.state in WAIT_FAILED:
                raise CommandError(f"run #{run.pk} ended {run.get_state_display().lower()}: {run.last_error or run.reason}")
            time.sleep(1)

    def _warn_revocation_gap(self, run: RotationRun) -> None:
        """An emergency run of a KEK whose provider keeps old versions usable does not revoke them there: say so."""
        if run.kek_id and run.kind == RotationRun.Kind.EMERGENCY:
            gap = key_services.revocation_gap(run.kek)
            if gap:
                self.stderr.write(f"warning: run #{run.pk} rotates and rewraps, but {gap}")

    def _status(self, options):
        summary = run_summary(run_numbered(options["run_id"]))
        if options["json"]:
            self.stdout.write(json.dumps(summary, indent=2))
            return
        if summary["secret"]:
            return self._secret_status(summary)
        self.stdout.write(
            f"run #{summary['id']} {summary['kind']} of {run_numbered(options['run_id']).target_label}: {summary['state']}\n"
            f"  rewrapped {summary['rewrapped']}/{summary['total']} ({summary['percent']}%), failed {summary['failed']}\n"
            f"  versions v{summary['previous_version']} -> v{summary['target_version']}, coverage {summary['coverage']}"
        )
        for limit in services.rate_limits_for_run(run_numbered(options["run_id"])):
            self.stdout.write(f"  rate limit {limit.describe()}")
        partitions = summary["partitions"]
        self.stdout.write(f"  partitions: {partitions['summary']}")
        for part in partitions["open_partitions"]:
            self.stdout.write(f"    #{part['id']} ids [{part['lo']}, {part['hi']}) {part['owner_label']!r}: "
                              f"lease {part['lease_label']}, {part['progress_label']}")
        if summary["last_error"]:
            self.stdout.write(f"  last error: {summary['last_error']}")

    def _secret_status(self, summary: dict) -> None:
        """A managed secret's run: no data keys, but steps a person may have to do."""
        self.stdout.write(f"run #{summary['id']} {summary['kind']} of secret {summary['secret']}: {summary['state']}")
        if summary["paused_reason"]:
            self.stdout.write(f"  paused: {summary['paused_reason']}")
        if summary["retire_after"] and summary["state"] == S.RETIRING:
            self.stdout.write(f"  the old credential retires after {summary['retire_after']}")
        for step in summary["steps"]:
            who = f" by {step['done_by']}" if step["done_by"] else ""
            self.stdout.write(f"  [{step['status']}] {step['key']} ({'auto' if step['automatic'] else 'manual'}){who}")
        if summary["last_error"]:
            self.stdout.write(f"  last error: {summary['last_error']}")

    def _list(self, options):
        runs = RotationRun.objects.select_related("kek", "secret").order_by("-pk")
        if options["active"]:
            runs = runs.filter(state__in=RotationRun.ACTIVE_STATES)
        for run in runs[: options["limit"]]:
            self.stdout.write(f"#{run.pk}\t{run.target_label}\t{run.kind}\t{run.state}\t{run.rewrapped}/{run.total_deks}\t{run.created_at:%Y-%m-%d %H:%M}")

    def _approve(self, options):
        user = self._user(options)
        if user is None:
            raise CommandError("approve needs --user NAME (the approver)")
        run = services.decide(
            run_numbered(options["run_id"]), user=user, actor=self.actor(options), comment=options["comment"],
            decision="reject" if options["reject"] else "approve", break_glass=options["break_glass"],
        )
        run.refresh_from_db()
        self.stdout.write(f"run #{run.pk} is {run.get_state_display().lower()}")

    def _cancel(self, options):
        run = services.cancel(run_numbered(options["run_id"]), actor=self.actor(options), reason=options["reason"])
        self.stdout.write(f"run #{run.pk} cancelled")

    def _rollback(self, options):
        run = services.rollback(run_numbered(options["run_id"]), actor=self.actor(options), reason=options["reason"])
        self.stdout.write(f"run #{run.pk} rolled back")

    def _resume(self, options):
        run = services.resume(run_numbered(options["run_id"]), actor=self.actor(options))
        self.stdout.write(f"run #{run.pk} queued again")

    def _tick(self, options):
        step = services.tick_manual_step(run_numbered(options["run_id"]), options["step"], actor=self.actor(options),
                                         evidence=options["evidence"])
        self.stdout.write(f"step {step.key} done by {step.done_by}")

    def _wait(self, options):
        self._follow(run_numbered(options["run_id"]).pk)

    def _work(self, options):
        run = services.drive(run_numbered(options["run_id"]).pk)
        self.stdout.write(f"run #{run.pk} is {run.get_state_display().lower()}")

    def _policy(self, options):
        kek = kek_named(options["kek"])
        changes = {}
        try:
            if options["period"]:
                changes["period"] = parse_period(options["period"])
            if options["grace"]:
                changes["grace_period"] = parse_period(options["grace"])
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        if options["approvals"] is not None:
            changes["approvals_required"] = options["approvals"]
        if options["usage_threshold"] is not None:
            changes["usage_threshold"] = options["usage_threshold"] or None
        if options["auto"] is not None:
            changes["auto"] = options["auto"]
        policy = services.update_policy(kek, actor=self.actor(options), **changes) if changes else services.ensure_policy(kek)
        self.stdout.write(
            f"KEK {kek.name}: every {format_period(policy.period)}, grace {format_period(policy.grace_period)}, "
            f"{policy.approvals_required} approval(s), {'automatic' if policy.auto else 'manual'}, "
            f"next due {policy.next_due_at:%Y-%m-%d %H:%M} UTC"
        )
        for warning in policy.warnings():
            self.stderr.write(f"warning: {warning}")

    def _rate_limit(self, options):
        provider = options["provider"]
        if options["cap"] is not None or options["default"]:
            if not provider:
                raise CommandError("say which provider: --provider NAME")
            try:
                services.set_rate_limit(provider, None if options["default"] else options["cap"],
                                        actor=self.actor(options))
            except ValueError as exc:
                raise CommandError(str(exc)) from None
        names = [provider] if provider else sorted(settings.KMS.get("providers", {}))
        for name in names:
            self.stdout.write(services.rate_limit_status(name).describe())

    def _sweep(self, options):
        started = services.dispatch_due_rotations()
        self.stdout.write(f"started {len(started)} run(s)" + "".join(f"\n  #{r.pk} {r.kek.name}" for r in started))
