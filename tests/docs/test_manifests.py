"""Every Kubernetes manifest in the docs is valid against the Kubernetes OpenAPI schema.

Each ``yaml`` block of a Markdown file in the repository is split into its documents;
every document with ``apiVersion`` and ``kind`` is validated offline, with
``kubernetes-validate`` (its schemas ship in the wheel), against the schema of
:data:`KUBERNETES_VERSION`, **strict**: an unknown or misspelt field (``envFrom:
secretRef`` written as ``secretRefs``, ``httpHeader`` for ``httpHeaders``) fails, not
only a wrong type or a missing required field.

A parse is not enough: a readiness probe without the right fields, a ``secretRef`` to a
ConfigMap, a CronJob without ``serviceAccountName`` all parse. The cross-object checks
below catch what a schema cannot: references between the documented objects.
"""

from __future__ import annotations

import re
import subprocess
import textwrap
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.docs.examples import ROOT

#: The Kubernetes minor version the manifests are written for (schemas of later ones may drop fields).
KUBERNETES_VERSION = "1.33.0"

#: Objects in the docs that are configuration files read by a component, not API objects:
#: there is no OpenAPI schema to validate them against. Listed, so nothing is skipped silently.
NOT_API_OBJECTS = {
    ("apiserver.config.k8s.io/v1", "EncryptionConfiguration"): "the API server's --encryption-provider-config file",
}


def _markdown_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True, text=True, check=True)
    return sorted(ROOT / name for name in listed.stdout.split())


#: A yaml fence, also indented inside a list item (its content is dedented by the fence's indent).
YAML_FENCE = re.compile(r"^( *)```ya?ml\b[^\n]*\n(.*?)^\1```[ \t]*$", re.MULTILINE | re.DOTALL)


def manifests() -> list[tuple[str, dict]]:
    """``(where, object)`` for every document with apiVersion and kind in a yaml block."""
    found = []
    for path in _markdown_files():
        text = path.read_text()
        for match in YAML_FENCE.finditer(text):
            where = f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, match.start()) + 1}"
            for index, document in enumerate(yaml.safe_load_all(textwrap.dedent(match.group(2)))):
                if isinstance(document, dict) and "apiVersion" in document and "kind" in document:
                    found.append((f"{where}#{index}:{document['kind']}", document))
    return found


MANIFESTS = manifests()
API_OBJECTS = [(where, obj) for where, obj in MANIFESTS if (obj["apiVersion"], obj["kind"]) not in NOT_API_OBJECTS]


def validate(obj: dict) -> None:
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize(("where", "obj"), API_OBJECTS, ids=[where for where, _ in API_OBJECTS])
def test_manifest_is_valid_against_the_kubernetes_schema(where, obj):
    try:
        validate(obj)
    except kubernetes_validate.ValidationError as error:
        pytest.fail(f"{where}: {error.message} at {'.'.join(str(part) for part in error.path)}")


def test_the_docs_have_manifests_and_only_listed_exemptions():
    kinds = {obj["kind"] for _, obj in API_OBJECTS}
    assert {"Deployment", "Secret", "ConfigMap", "ServiceAccount", "Role", "RoleBinding"} <= kinds
    exempt = {(obj["apiVersion"], obj["kind"]) for _, obj in MANIFESTS} & set(NOT_API_OBJECTS)
    assert exempt == set(NOT_API_OBJECTS), "remove exemptions no document uses"


@pytest.mark.parametrize(
    ("field_path", "value"),
    [
        (("spec", "template", "spec", "containers", 0, "readinessProbe", "httpGet", "httpHeader"), []),
        (("spec", "template", "spec", "serviceAcountName"), "keyvault"),
        (("spec", "replicas"), "two"),
    ],
    ids=["misspelt-probe-field", "misspelt-pod-field", "wrong-type"],
)
def test_the_validator_refuses_a_bad_field(field_path, value):
    # given the documented web Deployment, valid as written
    deployment = next(obj for _, obj in API_OBJECTS if obj["kind"] == "Deployment")
    validate(deployment)
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    node = broken
    for part in field_path[:-1]:
        node = node[part]

    # when one field is misspelt or mistyped, then strict validation refuses it
    node[field_path[-1]] = value
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken)


# -- references between the documented objects -------------------------------------------


def _objects(kind: str) -> list[dict]:
    return [obj for _, obj in API_OBJECTS if obj["kind"] == kind]


def _pod_specs() -> list[tuple[str, dict]]:
    specs = []
    for where, obj in API_OBJECTS:
        if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            specs.append((where, obj["spec"]["template"]["spec"]))
        elif obj["kind"] == "CronJob":
            specs.append((where, obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
    return specs


POD_SPECS = _pod_specs()


@pytest.mark.parametrize(("where", "pod"), POD_SPECS, ids=[where for where, _ in POD_SPECS])
def test_pods_refer_only_to_objects_of_the_right_kind(where, pod):
    config_maps = {obj["metadata"]["name"] for obj in _objects("ConfigMap")}
    secrets = {obj["metadata"]["name"] for obj in _objects("Secret")}
    for container in pod["containers"]:
        for source in container.get("envFrom", []):
            if "secretRef" in source:
                assert source["secretRef"]["name"] in secrets, f"{where}: secretRef to a {source} that is no Secret"
            if "configMapRef" in source:
                assert source["configMapRef"]["name"] in config_maps, f"{where}: configMapRef to no ConfigMap"
        mounts = {mount["name"] for mount in container.get("volumeMounts", [])}
        volumes = {volume["name"] for volume in pod.get("volumes", [])}
        assert mounts <= volumes, f"{where}: mounts {mounts - volumes} without a volume"
    for volume in pod.get("volumes", []):
        if "secret" in volume:
            assert volume["secret"]["secretName"] in secrets, f"{where}: volume of an undocumented Secret"


@pytest.mark.parametrize(("where", "pod"), POD_SPECS, ids=[where for where, _ in POD_SPECS])
def test_every_keyvault_pod_runs_as_the_service_account_with_its_secrets(where, pod):
    # the ConfigMap names HMD_*_FILE paths and HMD_VAULT_KUBERNETES_ROLE: each pod needs both
    assert pod.get("serviceAccountName") == "keyvault", f"{where}: no serviceAccountName"
    config = {key: value for cm in _objects("ConfigMap") for key, value in cm.get("data", {}).items()}
    paths = [value for key, value in config.items() if key.endswith("_FILE")]
    for container in pod["containers"]:
        mounted = [mount["mountPath"] for mount in container.get("volumeMounts", [])]
        for path in paths:
            assert any(path.startswith(mount.rstrip("/") + "/") for mount in mounted), (
                f"{where}: {path} (from the ConfigMap) is not mounted in {container['name']}")


def _command(pod: dict) -> str:
    return " ".join(" ".join(container.get("command", []) + container.get("args", [])) for container in pod["containers"])


def test_exactly_one_beat_always_running_and_no_cronjob_instead():
    # beat runs every periodic job (docs/design/architecture.md#beat-jobs): one replica, never two
    beats = [obj for _, obj in API_OBJECTS if obj["kind"] == "Deployment"
             and " beat" in _command(obj["spec"]["template"]["spec"])]
    assert len(beats) == 1
    assert beats[0]["spec"]["replicas"] == 1 and beats[0]["spec"]["strategy"]["type"] == "Recreate"
    for where, obj in API_OBJECTS:
        if obj["kind"] == "CronJob":
            command = _command(obj["spec"]["jobTemplate"]["spec"]["template"]["spec"])
            assert "manage.py" not in command and "celery" not in command, f"{where}: a CronJob standing in for beat"


def test_the_web_readiness_probe_asks_healthz():
    web = next(obj for _, obj in API_OBJECTS if obj["kind"] == "Deployment" and "gunicorn" in
               _command(obj["spec"]["template"]["spec"]))
    probe = web["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]
    assert probe["path"] == "/healthz"
    config = {key: value for cm in _objects("ConfigMap") for key, value in cm.get("data", {}).items()}
    hosts = config["HMD_ALLOWED_HOSTS"].split(",")
    # /healthz answers any Host (keyvault.ops.healthz); a Host header, if given, is an allowed one
    assert all(header["value"] in hosts for header in probe.get("httpHeaders", []) if header["name"] == "Host")
