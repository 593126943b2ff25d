"""AWS Secrets Manager as a secret source (boto3).

A path is a secret name or ARN, optionally ``#field`` for one field of a
SecretString holding a JSON object (``aws:prod/db#password``). Versions are
Secrets Manager VersionIds:

* ``write`` creates the secret (``CreateSecret``) or adds a version
  (``PutSecretValue``), which moves ``AWSCURRENT`` to it and ``AWSPREVIOUS`` to
  the version that was current; a ``#field`` write merges into the current JSON.
  Secrets Manager has no compare-and-set, so two concurrent field writers can
  lose one update (unlike Vault, where we use ``cas``).
* ``list_versions`` lists every version AWS still keeps (``IncludeDeprecated``),
  oldest first; state is ``"enabled"`` while a version carries a staging label
  (AWSCURRENT, AWSPREVIOUS, AWSPENDING, custom), ``"deprecated"`` once it has none.
* ``delete_version``: AWS has no call that deletes one version. The closest is
  taking every staging label off it (``UpdateSecretVersionStage``), which makes
  it *deprecated*: AWS then removes it on its own schedule. Until then AWS still
  serves it by VersionId, but this source does not: ``read`` of a deprecated
  version raises :class:`SecretNotFound`, so nothing here hands out a retired value.
  Older versions that lost AWSPREVIOUS are deprecated the same way.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime

from keyvault.kms.loading import require_sdk

from .base import (
    CurrentVersionError,
    SecretAccessDenied,
    SecretNotFound,
    SecretSource,
    SecretSourceConfigurationError,
    SecretSourceError,
    SecretSourceUnavailable,
    SecretVersion,
    SecretVersionInfo,
    require_path,
    require_value,
    split_field,
)

CURRENT_STAGE = "AWSCURRENT"
_OPTIONS = {"region", "endpoint_url", "connect_timeout", "read_timeout", "max_attempts"}
_NOT_FOUND = {"ResourceNotFoundException"}
_DENIED = {
    "AccessDeniedException",
    "UnrecognizedClientException",
    "InvalidSignatureException",
    "ExpiredTokenException",
    "IncompleteSignature",
    "MissingAuthenticationToken",
}
_UNAVAILABLE = {"InternalServiceError", "InternalFailure", "ServiceUnavailable", "ThrottlingException", "RequestTimeout"}


SDK_MODULES = {
    "boto3": "boto3",
    "botocore": "botocore",
    "config": "botocore.config",
    "exceptions": "botocore.exceptions",
    "session": "botocore.session",
}


def _field_value(text: str, field_name: str | None, where: str) -> str:
    if field_name is None:
        return text
    try:
        document = json.loads(text)
    except ValueError:
        raise SecretNotFound(f"{where} is not a JSON object, so it has no field {field_name!r}") from None
    value = document.get(field_name) if isinstance(document, dict) else None
    if not isinstance(value, str):
        raise SecretNotFound(f"{where} has no text field {field_name!r}")
    return value


class AWSSecretsManagerSource(SecretSource):
    """Secrets in AWS Secrets Manager; see the module docstring."""

    name = "aws"

    def __init__(
        self,
        *,
        region: str = "",
        endpoint_url: str = "",
        connect_timeout: float = 5.0,
        read_timeout: float = 10.0,
        max_attempts: int = 3,
    ) -> None:
        botocore = require_sdk(
            SDK_MODULES, package="boto3", user="the aws secret source", error=SecretSourceConfigurationError
        ).botocore
        self._errors = botocore.exceptions
        self.region = region or ""
        self.endpoint_url = endpoint_url or ""
        if self.endpoint_url and not self.endpoint_url.startswith(("http://", "https://")):
            raise SecretSourceConfigurationError("HMD_AWS_SECRETSMANAGER_ENDPOINT_URL must be an http(s):// URL")
        try:
            config = botocore.config.Config(
                retries={"mode": "standard", "total_max_attempts": int(max_attempts)},
                connect_timeout=float(connect_timeout),
                read_timeout=float(read_timeout),
                user_agent_extra="keyvault",
            )
            self._client = botocore.session.Session().create_client(
                "secretsmanager", region_name=self.region or None, endpoint_url=self.endpoint_url or None, config=config
            )
        except self._errors.NoRegionError:
            raise SecretSourceConfigurationError("AWS Secrets Manager needs a region: set HMD_AWS_REGION") from None
        except (TypeError, ValueError, self._errors.BotoCoreError) as exc:
            raise SecretSourceConfigurationError(f"AWS Secrets Manager client could not be created: {exc}") from None

    @classmethod
    def from_config(cls, options: dict) -> AWSSecretsManagerSource:
        unknown = set(options) - _OPTIONS
        if unknown:
            raise SecretSourceConfigurationError(f"unknown aws secret source option(s): {', '.join(sorted(unknown))}")
        return cls(**options)

    def __repr__(self) -> str:
        return f"AWSSecretsManagerSource({self.endpoint_url or self.region or 'default region'!r})"

    # -- calling AWS ---------------------------------------------------

    def _call(self, operation: str, **params) -> dict:
        try:
            return getattr(self._client, operation)(**params)
        except (self._errors.ClientError, self._errors.BotoCoreError) as exc:
            raise self._translate(exc, operation) from None

    def _translate(self, exc: Exception, operation: str) -> SecretSourceError:
        errors = self._errors
        if isinstance(exc, errors.ClientError):
            error = exc.response.get("Error", {})
            code = error.get("Code", "")
            message = " ".join(str(error.get("Message", "")).split())[:300]
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            text = f"AWS Secrets Manager {operation}: {code}: {message}".rstrip(": ")
            if code in _UNAVAILABLE or status >= 500:
                return SecretSourceUnavailable(text)
            if code in _DENIED or status == 403:
                return SecretAccessDenied(text)
            if code in _NOT_FOUND:
                return SecretNotFound(text)
            return SecretSourceError(text)
        if isinstance(exc, (errors.ConnectionError, errors.HTTPClientError)):
            return SecretSourceUnavailable(f"AWS Secrets Manager {operation}: cannot reach {self.endpoint_url or self.region}")
        if isinstance(exc, (errors.NoCredentialsError, errors.PartialCredentialsError)):
            return SecretSourceConfigurationError(f"AWS credentials are missing or incomplete: {exc}")
        if isinstance(exc, errors.ParamValidationError):
            return SecretNotFound(f"AWS Secrets Manager {operation}: invalid secret id or version")
        return SecretSourceError(f"AWS Secrets Manager {operation} failed: {type(exc).__name__}")

    # -- the contract --------------------------------------------------

    @staticmethod
    def _split(path: str) -> tuple[str, str | None]:
        secret_id, field_name = split_field(require_path(path))
        if not secret_id:
            raise SecretNotFound("an AWS secret path names a secret")
        return secret_id, field_name

    def _get(self, secret_id: str, version: str | None = None) -> dict:
        params = {"SecretId": secret_id}
        if version is not None:
            params["VersionId"] = str(version)
        response = self._call("get_secret_value", **params)
        if "SecretString" not in response:
            raise SecretNotFound(f"AWS secret {secret_id} holds binary data, not text")
        return response

    def read(self, path: str, *, version: str | None = None) -> SecretVersion:
        secret_id, field_name = self._split(path)
        response = self._get(secret_id, version)
        stages = response.get("VersionStages") or []
        if not stages:
            raise SecretNotFound(f"version {version} of AWS secret {secret_id} is deprecated (deleted)")
        value = _field_value(response["SecretString"], field_name, f"AWS secret {secret_id}")
        return SecretVersion(
            path=path,
            version=response["VersionId"],
            value=value,
            created_at=response.get("CreatedDate"),
            current=CURRENT_STAGE in stages,
        )

    def write(self, path: str, value: str) -> SecretVersion:
        secret_id, field_name = self._split(path)
        require_value(value)
        token = str(uuid.uuid4())  # idempotency: a retried request does not add a second version
        try:
            current = self._get(secret_id)["SecretString"]
        except SecretNotFound:
            current = None
        if field_name is not None:
            try:
                document = json.loads(current) if current else {}
            except ValueError:
                raise SecretSourceError(f"AWS secret {secret_id} is not a JSON object; cannot set field {field_name!r}") from None
            if not isinstance(document, dict):
                raise SecretSourceError(f"AWS secret {secret_id} is not a JSON object; cannot set field {field_name!r}")
            text = json.dumps({**document, field_name: value})
        else:
            text = value
        if current is None:
            if secret_id.startswith("arn:"):
                raise SecretNotFound(f"no AWS secret {secret_id} (create it by name, not by ARN)")
            response = self._call("create_secret", Name=secret_id, SecretString=text, ClientRequestToken=token)
        else:
            response = self._call("put_secret_value", SecretId=secret_id, SecretString=text, ClientRequestToken=token)
        described = self._versions(secret_id)
        created = next((v.get("CreatedDate") for v in described if v["VersionId"] == response["VersionId"]), None)
        return SecretVersion(path=path, version=response["VersionId"], value=value, created_at=created, current=True)

    def _versions(self, secret_id: str) -> list[dict]:
        # DescribeSecret first: it answers ResourceNotFoundException for a missing secret
        # everywhere (moto 5.2 answers ListSecretVersionIds for one with HTTP 500).
        self._call("describe_secret", SecretId=secret_id)
        versions, token = [], None
        while True:
            params = {"SecretId": secret_id, "IncludeDeprecated": True, "MaxResults": 100}
            if token:
                params["NextToken"] = token
            response = self._call("list_secret_version_ids", **params)
            versions.extend(response.get("Versions") or [])
            token = response.get("NextToken")
            if not token:
                return versions

    def list_versions(self, path: str) -> list[SecretVersionInfo]:
        secret_id, _ = self._split(path)
        versions = self._versions(secret_id)
        # A stable sort: versions created within the same second keep the order AWS lists them in.
        versions.sort(key=lambda v: v.get("CreatedDate") or datetime.min)
        return [
            SecretVersionInfo(
                version=v["VersionId"],
                created_at=v.get("CreatedDate"),
                current=CURRENT_STAGE in (v.get("VersionStages") or []),
                state="enabled" if v.get("VersionStages") else "deprecated",
            )
            for v in versions
        ]

    def stages(self, path: str) -> dict[str, list[str]]:
        """VersionId -> staging labels, for callers that manage AWSPENDING themselves."""
        secret_id, _ = self._split(path)
        return {v["VersionId"]: list(v.get("VersionStages") or []) for v in self._versions(secret_id)}

    def delete_version(self, path: str, version: str) -> None:
        secret_id, _ = self._split(path)
        labels = self.stages(path)
        if version not in labels:
            raise SecretNotFound(f"AWS secret {secret_id} has no version {version}")
        if CURRENT_STAGE in labels[version]:
            raise CurrentVersionError(f"version {version} of AWS secret {secret_id} is AWSCURRENT; write a new one first")
        for label in labels[version]:
            self._call("update_secret_version_stage", SecretId=secret_id, VersionStage=label, RemoveFromVersionId=version)

    def health_check(self) -> tuple[bool, str]:
        try:
            self._call("list_secrets", MaxResults=1)
        except SecretSourceError as exc:
            return False, str(exc)
        return True, f"AWS Secrets Manager at {self.endpoint_url or self.region}"
