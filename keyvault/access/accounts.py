"""Who may get in, and with which rights: users, groups, permissions, 2FA devices, SIEM consumers.

Every change to these is a privilege change and goes into the audit chain with its
before and after values, whichever path made it:

* the console and Keyvault's commands call the services below (or run Django's own
  forms and commands inside :func:`recording`), which name the actor and write **one**
  event per changed user, group, device or consumer, in the caller's transaction;
* signal receivers (``post_save``, ``m2m_changed``, ``post_delete``) see every ORM
  write, so a change made anywhere else (``manage.py shell``, a script, a new view that
  forgot the service) is still recorded, as ``system:unattributed``.

The receivers compute the differences (one diff per model, in :data:`TRACKED`);
:func:`recording` only says who acts and merges what one operation changed into one
event per target (a form that flips ``is_superuser`` and adds a group is one
``user.changed``). Secrets never reach the details: password hashes are HMACed
(:func:`keyvault.audit.hmac_value`), TOTP secrets and SIEM tokens are left out.
Logins (``last_login``), 2FA counters and SIEM polling progress are not privilege
changes and are not recorded here.
"""

from __future__ import annotations

import getpass
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group, Permission
from django.db import models, transaction
from django.db.models.signals import m2m_changed, post_delete, post_save, pre_delete, pre_save

from keyvault import audit
from keyvault.audit import Action, Actor, events
from keyvault.exceptions import KeyvaultError
from keyvault.keys import services
from keyvault.models import KeyEncryptionKey, SiemConsumer, TOTPDevice

#: Who changed something outside any service or command (a shell, a script).
UNATTRIBUTED = Actor.system("unattributed")


class AccountError(KeyvaultError, ValueError):
    """An account, group or device change that cannot be made (unknown user, no device…)."""


# -- what is tracked, and how it reads in the log --------------------------------------------


def _perm_label(permission: Permission) -> str:
    return f"{permission.content_type.app_label}.{permission.codename}"


def _user_snapshot(user) -> dict:
    return {
        "username": user.get_username(),
        "email": user.email,
        "first_name": user.first_name,
        "last_name": user.last_name,
        "is_active": user.is_active,
        "is_staff": user.is_staff,
        "is_superuser": user.is_superuser,
    }


def _device_snapshot(device: TOTPDevice) -> dict:
    return {"device": device.persistent_id, "name": device.name, "confirmed": device.confirmed}


@dataclass(frozen=True)
class Tracked:
    """How changes to one model are recorded."""

    target: Callable[[models.Model], tuple[str, str]]
    snapshot: Callable[[models.Model], dict]
    created: str
    changed: str
    deleted: str
    #: Columns whose change alone is not a privilege change (None: every column counts).
    quiet_fields: frozenset[str] = frozenset()
    #: Read the row back without these columns (the TOTP secret is never decrypted for a diff).
    defer: tuple[str, ...] = ()


def _user_target(user) -> tuple[str, str]:
    return "user", user.get_username()


def _device_target(device: TOTPDevice) -> tuple[str, str]:
    return "user", device.user.get_username()


TRACKED: dict[type[models.Model], Tracked] = {
    get_user_model(): Tracked(
        target=_user_target, snapshot=_user_snapshot,
        created=Action.USER_CREATED, changed=Action.USER_CHANGED, deleted=Action.USER_DELETED,
        quiet_fields=frozenset({"last_login"}),
    ),
    Group: Tracked(
        target=lambda group: ("group", group.name), snapshot=lambda group: {"name": group.name},
        created=Action.GROUP_CREATED, changed=Action.GROUP_CHANGED, deleted=Action.GROUP_DELETED,
    ),
    TOTPDevice: Tracked(
        target=_device_target, snapshot=_device_snapshot,
        created=Action.DEVICE_CREATED, changed=Action.DEVICE_CONFIRMED, deleted=Action.DEVICE_DELETED,
        # Verification bookkeeping (counters, drift, last use) changes at every login.
        quiet_fields=frozenset({"throttling_failure_timestamp", "throttling_failure_count", "last_used_at",
                                "drift", "last_t"}),
        defer=("key",),
    ),
    SiemConsumer: Tracked(
        target=lambda consumer: ("siemconsumer", consumer.name),
        snapshot=lambda consumer: {"name": consumer.name, "active": consumer.active,
                                   "token": audit.hmac_value(consumer.token_hash)},
        created=Action.SIEM_CONSUMER_CREATED, changed=Action.SIEM_CONSUMER_CHANGED,
        deleted=Action.SIEM_CONSUMER_CHANGED,
        quiet_fields=frozenset({"last_used_at", "last_sequence"}),  # every pull moves them
    ),
}


@dataclass(frozen=True)
class Relation:
    """A many-to-many relation whose membership is a privilege (groups, permissions)."""

    owner: type[models.Model]
    attribute: str
    label: Callable[[models.Model], str]

    def names(self, owner) -> list[str]:
        related = getattr(owner, self.attribute).all()
        if self.label is _perm_label:
            related = related.select_related("content_type")
        return sorted(self.label(item) for item in related)


def _relations() -> dict[type[models.Model], Relation]:
    User = get_user_model()
    return {
        User.groups.through: Relation(User, "groups", lambda group: group.name),
        User.user_permissions.through: Relation(User, "user_permissions", _perm_label),
        Group.permissions.through: Relation(Group, "permissions", _perm_label),
    }


RELATIONS = _relations()


# -- one event per target and operation ---------------------------------------------------------


@dataclass
class _Pending:
    action: str
    target: tuple[str, str]
    before: dict | None
    after: dict | None

    def merge(self, before: dict | None, after: dict | None) -> None:
        """Fold a later change of the same target in: first ``before`` wins, last ``after`` wins."""
        if self.before is not None and before:
            for key, value in before.items():
                self.before.setdefault(key, value)
        if self.after is not None and after:
            self.after.update(after)

    def details(self) -> dict | None:
        if self.before is not None and self.after is not None:
            changed = sorted(key for key in {*self.before, *self.after}
                             if self.before.get(key) != self.after.get(key))
            if not changed:
                return None  # a save that changed nothing is not an event
            before = {key: self.before.get(key) for key in changed}
            after = {key: self.after.get(key) for key in changed}
            return {"changed": changed, "before": before, "after": after}
        return {"before": self.before, "after": self.after}


class _Recording:
    """The changes one operation made, by target, written as events when it ends."""

    def __init__(self, actor: Actor) -> None:
        self.actor = actor
        self.pending: dict[tuple[str, tuple[str, str]], _Pending] = {}

    def add(self, action: str, target: tuple[str, str], before: dict | None, after: dict | None) -> None:
        created = self._created_action(action)
        if created and (created, target) in self.pending:  # changes right after creation fold into it
            self.pending[(created, target)].merge(None, after)
            return
        key = (action, target)
        if key in self.pending:
            self.pending[key].merge(before, after)
        else:
            self.pending[key] = _Pending(action, target, dict(before) if before is not None else None,
                                         dict(after) if after is not None else None)

    @staticmethod
    def _created_action(action: str) -> str | None:
        return {Action.USER_CHANGED: Action.USER_CREATED, Action.GROUP_CHANGED: Action.GROUP_CREATED,
                Action.USER_PASSWORD_CHANGED: Action.USER_CREATED,
                Action.DEVICE_CONFIRMED: Action.DEVICE_CREATED,
                Action.SIEM_CONSUMER_CHANGED: Action.SIEM_CONSUMER_CREATED}.get(action)

    def flush(self) -> list:
        written = []
        for pending in self.pending.values():
            details = pending.details()
            if details is not None:
                written.append(events.ACCOUNT_EVENTS[pending.action](pending.target, actor=self.actor, **details))
        self.pending.clear()
        return written


_current: ContextVar[_Recording | None] = ContextVar("keyvault_accounts_recording", default=None)


@contextmanager
def recording(actor: Actor) -> Iterator[None]:
    """Run account changes as ``actor``: one audit event per changed target, in one transaction.

    Nested calls join the outer recording (its actor stays). Django's own forms and
    commands (the user admin, ``createsuperuser``) run inside one of these.
    """
    if _current.get() is not None:
        yield
        return
    batch = _Recording(actor)
    token = _current.set(batch)
    try:
        with transaction.atomic():
            yield
            batch.flush()
    finally:
        _current.reset(token)


class _RoleSync(_Recording):
    """Records nothing: the roles' permissions as ``keyvault.access.roles`` defines them, re-applied at ``migrate``."""

    def add(self, *args, **kwargs) -> None:
        pass


@contextmanager
def syncing_roles() -> Iterator[None]:
    """Re-apply the role definitions (code, reviewed and deployed) without an event per group.

    ``migrate`` does it on the migration state's models, which no receiver sees; a test
    database flush does it on the real ones. Either way it is the deploy, not a person,
    granting rights, and the same rights every time.
    """
    token = _current.set(_RoleSync(Actor.system("migrate")))
    try:
        yield
    finally:
        _current.reset(token)


def _note(action: str, target: tuple[str, str], before: dict | None, after: dict | None) -> None:
    batch = _current.get()
    if batch is not None:
        batch.add(action, target, before, after)
        return
    single = _Recording(UNATTRIBUTED)  # outside any service: recorded anyway, and says so
    single.add(action, target, before, after)
    single.flush()


def command_actor() -> Actor:
    """The operating-system user running a management command."""
    return Actor.system(f"cli:{getpass.getuser()}")


# -- the signal receivers: every ORM path --------------------------------------------------------

_BEFORE = "_keyvault_accounts_before"


def _tracked(sender) -> Tracked | None:
    return TRACKED.get(sender)


def _changes_only_quiet_fields(tracked: Tracked, update_fields) -> bool:
    return update_fields is not None and set(update_fields) <= tracked.quiet_fields


def _before_save(sender, instance, raw=False, update_fields=None, **kwargs) -> None:
    if sender is TOTPDevice and instance.pk is None and not raw:
        ensure_field_kek()  # whoever creates a device, its secret is sealed under this KEK
    tracked = _tracked(sender)
    if tracked is None or raw or instance.pk is None or _changes_only_quiet_fields(tracked, update_fields):
        return
    stored = sender._default_manager.filter(pk=instance.pk).defer(*tracked.defer).first()
    if stored is not None:
        setattr(instance, _BEFORE, (tracked.snapshot(stored), stored.password if sender is get_user_model() else None))


def _after_save(sender, instance, created, raw=False, update_fields=None, **kwargs) -> None:
    tracked = _tracked(sender)
    if tracked is None or raw:
        return
    if created:
        after = tracked.snapshot(instance)
        if sender is get_user_model():
            after["password"] = _password_state(instance.password)
        _note(tracked.created, tracked.target(instance), None, after)
        return
    stored = instance.__dict__.pop(_BEFORE, None)
    if stored is None:
        return
    before, old_password = stored
    _note(tracked.changed, tracked.target(instance), before, tracked.snapshot(instance))
    if sender is get_user_model() and old_password != instance.password:
        rehash = update_fields is not None and set(update_fields) == {"password"} and instance._password is None
        if not rehash:  # a hash upgraded at login is the same password (as Django's own signal sees it)
            _note(Action.USER_PASSWORD_CHANGED, tracked.target(instance),
                  {"password": _password_state(old_password)}, {"password": _password_state(instance.password)})


def _password_state(password_hash: str) -> str:
    """What the log says about a password: unusable, or an HMAC of its hash (never the hash)."""
    if not password_hash or password_hash.startswith("!"):
        return "unusable"
    return audit.hmac_value(password_hash)


def _before_delete(sender, instance, **kwargs) -> None:
    tracked = _tracked(sender)
    if tracked is None:
        return
    snapshot = tracked.snapshot(instance)
    for relation in RELATIONS.values():
        if relation.owner is sender:
            snapshot[relation.attribute] = relation.names(instance)
    if sender is Group:  # memberships go with the group, without m2m signals
        snapshot["members"] = sorted(instance.user_set.values_list("username", flat=True))
    setattr(instance, _BEFORE, (tracked.target(instance), snapshot))


def _after_delete(sender, instance, **kwargs) -> None:
    tracked = _tracked(sender)
    if tracked is None:
        return
    target, before = instance.__dict__.pop(_BEFORE, (None, None))
    if target is None:
        target, before = tracked.target(instance), tracked.snapshot(instance)
    _note(tracked.deleted, target, before, None)


def _owners(relation: Relation, instance, reverse: bool, model, pk_set) -> list:
    if not reverse:
        return [instance]
    if pk_set is None:  # clearing from the far side: everyone who had it
        return list(relation.owner._default_manager.filter(**{relation.attribute: instance}))
    return list(relation.owner._default_manager.filter(pk__in=pk_set))


def _m2m_changed(sender, instance, action, reverse, model, pk_set, **kwargs) -> None:
    relation = RELATIONS.get(sender)
    if relation is None:
        return
    tracked = TRACKED[relation.owner]
    stash = f"_keyvault_m2m_{relation.attribute}"
    if action.startswith("pre_"):
        owners = _owners(relation, instance, reverse, model, pk_set)
        setattr(instance, stash, [(owner, relation.names(owner)) for owner in owners])
        return
    for owner, before in instance.__dict__.pop(stash, []):
        _note(tracked.changed, tracked.target(owner), {relation.attribute: before},
              {relation.attribute: relation.names(owner)})


def connect_signals() -> None:
    """Connect the receivers (``KeyvaultConfig.ready``); each once, by ``dispatch_uid``."""
    for model in TRACKED:
        uid = f"keyvault.access.accounts.{model._meta.label_lower}"
        pre_save.connect(_before_save, sender=model, dispatch_uid=f"{uid}.pre_save")
        post_save.connect(_after_save, sender=model, dispatch_uid=f"{uid}.post_save")
        pre_delete.connect(_before_delete, sender=model, dispatch_uid=f"{uid}.pre_delete")
        post_delete.connect(_after_delete, sender=model, dispatch_uid=f"{uid}.post_delete")
    for through in RELATIONS:
        m2m_changed.connect(_m2m_changed, sender=through, dispatch_uid=f"keyvault.access.accounts.{through._meta.label_lower}")


# -- services: users, groups, permissions ---------------------------------------------------------


def create_user(*, username: str, actor: Actor, password: str | None = None, is_staff: bool = True,
                is_superuser: bool = False, groups: Iterable[str] = (), email: str = ""):
    """Create a console user (one ``user.created`` event with its flags and groups)."""
    User = get_user_model()
    with recording(actor):
        if is_superuser:
            user = User.objects.create_superuser(username, email=email, password=password)
        else:
            user = User.objects.create_user(username, email=email, password=password, is_staff=is_staff)
        if groups:
            user.groups.set(_groups_named(groups))
    return user


def update_user(user, *, actor: Actor, **changes):
    """Change a user's flags or names (``is_active``, ``is_staff``, ``is_superuser``, ``email``…)."""
    allowed = {"email", "first_name", "last_name", "is_active", "is_staff", "is_superuser"}
    unknown = set(changes) - allowed
    if unknown:
        raise AccountError(f"cannot change {', '.join(sorted(unknown))} here")
    with recording(actor):
        for name, value in changes.items():
            setattr(user, name, value)
        user.save(update_fields=list(changes) or None)
    return user


def set_password(user, *, actor: Actor, password: str | None):
    """Set (or with ``None`` disable) a user's password; the log keeps an HMAC of the new hash only."""
    with recording(actor):
        if password is None:
            user.set_unusable_password()
        else:
            user.set_password(password)
        user.save()
    return user


def delete_user(user, *, actor: Actor) -> None:
    """Delete a user (their devices go with them, each recorded)."""
    with recording(actor):
        user.delete()


def set_user_groups(user, *, actor: Actor, groups: Iterable[str]):
    """Make the user's groups exactly ``groups`` (names)."""
    with recording(actor):
        user.groups.set(_groups_named(groups))
    return user


def set_user_permissions(user, *, actor: Actor, permissions: Iterable[str]):
    """Make the user's own permissions exactly ``permissions`` (``app_label.codename``)."""
    with recording(actor):
        user.user_permissions.set(_permissions_named(permissions))
    return user


def create_group(*, name: str, actor: Actor, permissions: Iterable[str] = ()) -> Group:
    with recording(actor):
        group = Group.objects.create(name=name)
        if permissions:
            group.permissions.set(_permissions_named(permissions))
    return group


def update_group(group: Group, *, actor: Actor, name: str | None = None,
                 permissions: Iterable[str] | None = None, members: Iterable[str] | None = None) -> Group:
    """Rename a group, set its permissions, or set its members (usernames)."""
    with recording(actor):
        if name is not None and name != group.name:
            group.name = name
            group.save(update_fields=["name"])
        if permissions is not None:
            group.permissions.set(_permissions_named(permissions))
        if members is not None:
            group.user_set.set(_users_named(members))
    return group


def delete_group(group: Group, *, actor: Actor) -> None:
    with recording(actor):
        group.delete()


def _groups_named(names: Iterable[str]) -> list[Group]:
    names = set(names)
    groups = list(Group.objects.filter(name__in=names))
    missing = names - {group.name for group in groups}
    if missing:
        raise AccountError(f"no such group: {', '.join(sorted(missing))}")
    return groups


def _users_named(names: Iterable[str]) -> list:
    names = set(names)
    users = list(get_user_model().objects.filter(username__in=names))
    missing = names - {user.get_username() for user in users}
    if missing:
        raise AccountError(f"no such user: {', '.join(sorted(missing))}")
    return users


def _permissions_named(labels: Iterable[str]) -> list[Permission]:
    found = []
    for label in set(labels):
        app_label, _, codename = label.partition(".")
        permission = Permission.objects.filter(content_type__app_label=app_label, codename=codename).first()
        if permission is None:
            raise AccountError(f"no such permission: {label}")
        found.append(permission)
    return found


def user_named(username: str):
    user = get_user_model().objects.filter(username=username).first()
    if user is None:
        raise AccountError(f"no such user: {username}")
    return user


# -- services: TOTP devices ---------------------------------------------------------------------

#: Name of the device enrolment creates.
DEVICE_NAME = "console"


def ensure_field_kek() -> None:
    """Make sure the field-encryption KEK exists: a TOTP secret is sealed under it.

    A fresh installation has it from ``bootstrap``; an upgraded one may not, and
    enrolment must not fail for that. Created on the default provider and audited.
    """
    if not KeyEncryptionKey.objects.filter(name=settings.FIELD_ENCRYPTION_KEK).exists():
        services.create_kek(name=settings.FIELD_ENCRYPTION_KEK, actor=Actor.system("2fa"),
                            description="Encrypts Keyvault's own secrets at rest (TOTP secrets, encrypted fields).")


def create_device(user, *, actor: Actor, confirmed: bool = False, name: str = DEVICE_NAME) -> TOTPDevice:
    """A new TOTP device with a fresh secret, sealed under the field KEK (``2fa.device_created``)."""
    with recording(actor):
        return TOTPDevice.objects.create(user=user, name=name, confirmed=confirmed)


def pending_device(user, *, actor: Actor) -> TOTPDevice:
    """The user's unconfirmed device, created (and recorded) if they have none."""
    device = TOTPDevice.objects.filter(user=user, confirmed=False).order_by("pk").first()
    return device if device is not None else create_device(user, actor=actor)


def confirm_device(device: TOTPDevice, *, actor: Actor) -> TOTPDevice:
    """Mark a device confirmed after its first good code (``2fa.device_confirmed``)."""
    with recording(actor):
        device.confirmed = True
        device.save(update_fields=["confirmed"])
    return device


def delete_device(device: TOTPDevice, *, actor: Actor) -> None:
    with recording(actor):
        device.delete()


def reset_devices(user, *, actor: Actor) -> int:
    """Delete every TOTP device of ``user`` (a lost phone): they enrol again at their next login."""
    with recording(actor):
        devices = list(TOTPDevice.objects.filter(user=user).select_related("user"))
        for device in devices:
            device.delete()
    return len(devices)


def reset_throttle(user, *, actor: Actor) -> int:
    """Clear the failure back-off of ``user``'s devices (``2fa.throttle_reset``); returns how many had one."""
    with transaction.atomic():
        devices = list(TOTPDevice.objects.select_for_update().filter(user=user, throttling_failure_count__gt=0)
                       .defer("key"))
        for device in devices:
            before = device.throttling_failure_count
            TOTPDevice.objects.filter(pk=device.pk).update(throttling_failure_count=0,
                                                           throttling_failure_timestamp=None)
            events.device_throttle_reset(user.get_username(), actor=actor, device=device.persistent_id,
                                         failures_before=before)
    return len(devices)
