"""The AWS KMS provider, through boto3, against moto's real HTTP server.

moto emulates the KMS API but does not refuse cryptography on disabled keys or
keys pending deletion; the contract tests that expect ``KeyDisabled`` therefore
exercise the provider's own state checks (see ``tests/keyvault/kms/test_aws.py``).
"""

import pytest

from keyvault.kms.aws import AWSKMSProvider
from tests.keyvault.kms.harness import Harness, aws_version

pytest_plugins = ["tests.servers.moto"]

NAME = "aws"


def moto_provider(server, **options) -> AWSKMSProvider:
    """A provider talking to ``server`` (or the ``endpoint_url`` given, e.g. a proxy in front) with short timeouts."""
    settings = {"endpoint_url": server.endpoint_url, "connect_timeout": 2.0, "read_timeout": 5.0, "max_attempts": 2,
                **options}
    return AWSKMSProvider(region=server.region, **settings)


@pytest.fixture(scope="session")
def aws_harness(moto_server):
    def broken() -> AWSKMSProvider:
        from tests.servers.moto import free_port  # imported late: pytest loads the module as a plugin first

        # Nothing listens on this port: connection refused at once, one attempt only.
        return AWSKMSProvider(
            region=moto_server.region,
            endpoint_url=f"http://127.0.0.1:{free_port()}",
            connect_timeout=0.5,
            read_timeout=0.5,
            max_attempts=1,
        )

    yield Harness(provider=moto_provider(moto_server), broken_provider=broken, name_version=aws_version)
