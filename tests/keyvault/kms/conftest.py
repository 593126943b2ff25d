import pytest

from tests.keyvault.kms.backends import BACKEND_NAMES


@pytest.fixture(params=BACKEND_NAMES)
def harness(request):
    """The contract suite's backend: every module of ``tests/keyvault/kms/backends`` in turn."""
    return request.getfixturevalue(f"{request.param}_harness")


@pytest.fixture
def provider(harness):
    return harness.provider
