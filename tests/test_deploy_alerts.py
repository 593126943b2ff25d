"""The Prometheus alert rules in deploy/ are valid, fire when they should, use only metrics
Keyvault really exports, and point at runbook sections that exist.

``promtool`` (Debian package ``prometheus``, installed by scripts/system-deps.sh) checks the
rules and runs their unit tests (``keyvault-alerts.test.yml``). Without it, outside CI, those
two tests are skipped and the structural checks below still run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.docs.test_examples import _anchors

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "keyvault-alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "keyvault-alerts.test.yml"
#: Where the runbook_url annotations say the docs are published; the rest of the URL is a path in this repository.
DOCS_URL = "https://git.example.com/keyvault/-/blob/main/"
TOKEN = "alerts-scrape-9f3e"

#: PromQL words that are not metric names.
PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "time", "bool", "offset", "rate", "increase", "absent", "clamp_min", "clamp_max",
}
IDENTIFIER = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def alerts() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"] if "alert" in rule]


ALERTS = alerts()


def metric_selectors(expr: str) -> list[tuple[str, set[str]]]:
    """``(metric, label names matched)`` for every series selector in a PromQL expression."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    grouped = re.sub(r"\b(by|without|on|ignoring)\s*\(([^)]*)\)", " ", expr)
    found = []
    for match in IDENTIFIER.finditer(grouped):
        name, rest = match.group(0), grouped[match.end():]
        if name in PROMQL_WORDS or rest.lstrip().startswith("(") or grouped[max(0, match.start() - 1)] in "{,=":
            continue
        if re.match(r"\s*=", rest) and "{" in grouped[:match.start()] and "}" not in grouped[grouped.rfind("{", 0, match.start()):match.start()]:
            continue  # a label name inside {…}
        labels = set()
        braces = re.match(r"\s*\{([^}]*)\}", rest)
        if braces:
            labels = {part.split("=")[0].strip().rstrip("!~") for part in braces.group(1).split(",") if part.strip()}
        found.append((name, labels))
    return found


def grouping_labels(expr: str) -> set[str]:
    return {label.strip() for group in re.findall(r"\bby\s*\(([^)]*)\)", expr) for label in group.split(",") if label.strip()}


@pytest.fixture
def exported(client, settings) -> dict[str, set[str]]:
    """Metric family name -> label names, from a real scrape of /metrics (state rows present, a health check run)."""
    from django.utils import timezone

    from keyvault.audit import Actor
    from keyvault.keys import services as key_services
    from keyvault.models import ManagedSecret
    from rotation.models import RotationRun

    assert client.get("/healthz").status_code == 200  # a probe sets the provider health gauge
    ManagedSecret.objects.create(name="api-tls", secret_type="tls_certificate", source="file", path="/tls",
                                 expires_at=timezone.now())
    kek = key_services.create_kek(name="scraped", actor=Actor.system("tests"))
    RotationRun.objects.create(kek=kek, state=RotationRun.State.PENDING_APPROVAL, kind="emergency", initiator="user:a")
    settings.METRICS_TOKEN = TOKEN
    response = client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert response.status_code == 200
    families: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            families.setdefault(sample.name, set()).update(sample.labels)
        families.setdefault(family.name, set())
    return families


def test_the_rules_have_alerts_for_what_the_issue_asks():
    names = {rule["alert"] for rule in ALERTS}
    assert len(names) == len(ALERTS)
    assert {"KeyvaultRotationRunFailed", "KeyvaultRotationRunPaused", "KeyvaultRotationOverdue",
            "KeyvaultCertificateExpiringSoon", "KeyvaultAuditChainBroken"} <= names


@pytest.mark.django_db
@pytest.mark.parametrize("rule", ALERTS, ids=[rule["alert"] for rule in ALERTS])
def test_each_expression_uses_only_what_keyvault_exports(rule, exported):
    selectors = metric_selectors(rule["expr"])
    assert selectors, f"no metric found in {rule['expr']!r}"
    for metric, labels in selectors:
        assert metric in exported, f"{rule['alert']}: {metric} is not exported by /metrics"
        assert labels <= exported[metric], f"{rule['alert']}: {metric} has no label(s) {labels - exported[metric]}"
        assert grouping_labels(rule["expr"]) <= exported[metric], f"{rule['alert']}: grouping by a missing label"


@pytest.mark.parametrize("rule", ALERTS, ids=[rule["alert"] for rule in ALERTS])
def test_each_alert_has_a_severity_a_summary_and_a_runbook_that_exists(rule):
    assert rule["labels"]["severity"] in {"critical", "warning"}
    assert rule["annotations"]["summary"]
    url = rule["annotations"]["runbook_url"]
    assert url.startswith(DOCS_URL), url
    path, _, anchor = url[len(DOCS_URL):].partition("#")
    doc = ROOT / path
    assert doc.is_file() and doc.suffix == ".md", f"{rule['alert']}: no document {path}"
    assert anchor and anchor in _anchors(doc), f"{rule['alert']}: {path} has no section #{anchor}"


def test_the_selector_scan_finds_metrics_and_their_labels():
    expr = '(min by (secret) (kv_expiry{type="tls",x!="y"}) - time()) < 14 * 86400 and on(a) other_metric'
    assert metric_selectors(expr) == [("kv_expiry", {"type", "x"}), ("other_metric", set())]
    assert grouping_labels(expr) == {"secret"}


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is missing: scripts/system-deps.sh installs the Debian package prometheus")
        pytest.skip("promtool not installed (scripts/system-deps.sh installs it)")
    return found


def test_promtool_accepts_the_rules():
    result = subprocess.run([_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def test_the_alerts_fire_in_promtools_unit_tests():
    # each alert fires on a bad state and stays quiet before its `for:` has passed (keyvault-alerts.test.yml)
    result = subprocess.run([_promtool(), "test", "rules", str(RULE_TESTS)], capture_output=True, text=True,
                            timeout=120, cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert tested == {rule["alert"] for rule in ALERTS} - {"KeyvaultAuditWitnessWriteFailing", "KeyvaultStateUnreadable"}
