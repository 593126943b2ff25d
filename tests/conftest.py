"""Suite-wide fixtures. Backend harnesses for the KMS contract suite load as plugins."""

from tests.kms.backends import BACKEND_MODULES

pytest_plugins = BACKEND_MODULES
