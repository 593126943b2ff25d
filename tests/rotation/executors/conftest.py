"""Shared fixtures for the secret executors: a real file secret source and inline driving."""

from __future__ import annotations

from datetime import datetime

import pytest
from django.test import override_settings

from keyvault.secrets import get_source
from rotation import services
from rotation.models import RotationRun


@pytest.fixture
def file_source(tmp_path, settings):
    """The real file source in a fresh directory, configured as ``file`` (and the default)."""
    config = {"default": "file", "sources": {"file": {"directory": str(tmp_path / "secrets")}}}
    with override_settings(SECRET_SOURCES=config):
        yield get_source("file")


def rotate(secret, *, actor, now: datetime | None = None, kind: str = "on_demand", **kwargs) -> RotationRun:
    """Start a run of ``secret`` and drive it in this process as far as it goes."""
    with services.inline_dispatch():
        run = services.start_run(secret=secret, actor=actor, kind=kind, **kwargs)
    return services.drive(run.pk, now=now)


def steps(run: RotationRun) -> dict[str, str]:
    return dict(run.steps.values_list("key", "status"))
