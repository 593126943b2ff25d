"""Rotation executors for managed secrets: one module per secret type.

The rotation engine's managed-secret driver (``rotation.engine.drivers.secret``) runs
a secret's run through the same states, steps, approvals and audit events as a KEK
run, and asks the executor of the secret's type to do the work of each phase (see
:mod:`rotation.executors.base`) and for its policy defaults. The cookie-signing keyring
format lives below, in :mod:`keyvault.secrets.keyring`: the project's settings read it too.
"""

from keyvault.kms.loading import import_string
from rotation.exceptions import ExecutorError

EXECUTORS = {
    "cookie_signing": "rotation.executors.cookie.CookieSigningExecutor",
    "database_credential": "rotation.executors.postgres.PostgresCredentialExecutor",
    "tls_certificate": "rotation.executors.tls.TLSCertificateExecutor",
    "oauth_client_secret": "rotation.executors.oauth.OAuthClientSecretExecutor",
    "generic": "rotation.executors.generic.GenericSecretExecutor",
    "vault_approle_secret_id": "rotation.executors.approle.AppRoleSecretIdExecutor",
    "api_client_token": "rotation.executors.apitoken.ApiClientTokenExecutor",
}


def executor_for(secret_type: str):
    """An executor instance for ``secret_type``.

    :raises ExecutorError: no executor for that type.
    """
    try:
        dotted = EXECUTORS[secret_type]
    except KeyError:
        raise ExecutorError(f"no rotation executor for secret type {secret_type!r}") from None
    return import_string(dotted, what=f"rotation executor for {secret_type!r}", error=ExecutorError)()
