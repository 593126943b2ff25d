"""Provider options read from ``HMD_*`` variables, declared by each provider next to its code.

A provider class lists its options (``OPTIONS``, a tuple of :class:`Option`) and
the variables whose presence means it is configured (``CONFIGURED_BY``);
:func:`keyvault.kms.registry.providers_from_env` turns them into
``settings.KMS["providers"]``, so the settings module knows no provider's schema.

The reader is anything with django-environ's ``str``/``int``/``float``/``bool``
methods: the settings pass their file-aware ``env`` (``HMD_X_FILE`` works for
every option); :class:`MappingEnv` reads a plain mapping, for use without
django-environ. Nothing here imports Django.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

Kind = Literal["str", "int", "float", "bool"]


@dataclass(frozen=True, slots=True)
class Option:
    """One provider option: its name in the provider's options, its variable, default and type."""

    name: str
    variable: str
    default: Any
    kind: Kind = "str"


class EnvReader(Protocol):
    """The part of django-environ's ``Env`` that reading options needs."""

    def str(self, var: str, default: Any = ...) -> str: ...

    def int(self, var: str, default: Any = ...) -> int: ...

    def float(self, var: str, default: Any = ...) -> float: ...

    def bool(self, var: str, default: Any = ...) -> bool: ...


_TRUE = frozenset({"true", "on", "ok", "y", "yes", "1"})


class MappingEnv:
    """An :class:`EnvReader` over a plain mapping (``os.environ`` or a dict), without files."""

    def __init__(self, variables: Mapping[str, str]) -> None:
        self.variables = variables

    def is_set(self, var: str) -> bool:
        """Whether ``var`` holds a non-empty value."""
        return bool(self.variables.get(var))

    def _get(self, var: str, default: Any, convert) -> Any:
        value = self.variables.get(var)
        return default if value is None else convert(value)

    def str(self, var: str, default: Any = "") -> str:
        return self._get(var, default, lambda value: value)

    def int(self, var: str, default: Any = 0) -> int:
        return self._get(var, default, int)

    def float(self, var: str, default: Any = 0.0) -> float:
        return self._get(var, default, float)

    def bool(self, var: str, default: Any = False) -> bool:
        return self._get(var, default, lambda value: value.strip().lower() in _TRUE)


def read_options(options: Iterable[Option], env: EnvReader) -> dict[str, Any]:
    """``{option name: value}`` for each option, from its variable or its default."""
    return {option.name: getattr(env, option.kind)(option.variable, default=option.default) for option in options}
