"""A local provider whose backend can be switched off, to test outages mid-run.

It is the real :class:`LocalKMSProvider` (real keyring, real AES-GCM); only its
availability is controlled, through a flag file any process can see.
"""

from pathlib import Path

from keyvault.kms import ProviderUnavailable
from keyvault.kms.local import LocalKMSProvider


class FlakyLocalProvider(LocalKMSProvider):
    name = "flaky"

    outage_flag: Path

    @classmethod
    def from_config(cls, options):
        options = dict(options)
        flag = Path(options.pop("outage_flag"))
        provider = super().from_config(options)
        provider.outage_flag = flag
        return provider

    def _check(self):
        if self.outage_flag.exists():
            raise ProviderUnavailable("flaky provider is down (outage flag present)")

    def encrypt(self, *args, **kwargs):
        self._check()
        return super().encrypt(*args, **kwargs)

    def decrypt(self, *args, **kwargs):
        self._check()
        return super().decrypt(*args, **kwargs)

    def rotate_key(self, *args, **kwargs):
        self._check()
        return super().rotate_key(*args, **kwargs)

    def health_check(self):
        status = super().health_check()
        if self.outage_flag.exists():
            return type(status)(healthy=False, provider=self.name, latency_ms=status.latency_ms, detail="outage flag present")
        return status
