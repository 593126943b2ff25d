"""A local provider whose backend can be switched off or made to throttle, to test outages mid-run.

It is the real :class:`LocalKMSProvider` (real keyring, real AES-GCM); only its
availability is controlled, through flag files any process can see, and its bulk
calls are counted.
"""

from pathlib import Path

from keyvault.kms import ProviderUnavailable, Throttled
from keyvault.kms.local import LocalKMSProvider

#: What a throttling refusal asks the caller to wait, in seconds (short: tests wait it out).
RETRY_AFTER = 0.05


class FlakyLocalProvider(LocalKMSProvider):
    name = "flaky"

    outage_flag: Path
    throttle_flag: Path | None = None

    @classmethod
    def from_config(cls, options):
        options = dict(options)
        flag = Path(options.pop("outage_flag"))
        throttle = options.pop("throttle_flag", None)
        provider = super().from_config(options)
        provider.outage_flag = flag
        provider.throttle_flag = Path(throttle) if throttle else None
        provider.bulk_calls = []
        return provider

    def _check(self):
        if self.outage_flag.exists():
            raise ProviderUnavailable("flaky provider is down (outage flag present)")

    def _throttle(self):
        """Follow the throttle flag file's script, one word per bulk call: ``ok`` answers, ``throttle`` refuses."""
        if self.throttle_flag is None or not self.throttle_flag.exists():
            return
        script = self.throttle_flag.read_text().split()
        if script:
            self.throttle_flag.write_text(" ".join(script[1:]))
            if script[0] == "throttle":
                raise Throttled("flaky provider: request quota exceeded", retry_after=RETRY_AFTER)

    def encrypt(self, *args, **kwargs):
        self._check()
        return super().encrypt(*args, **kwargs)

    def decrypt(self, *args, **kwargs):
        self._check()
        return super().decrypt(*args, **kwargs)

    def rewrap_many(self, items, *, key_id=None):
        self._check()
        self._throttle()
        self.bulk_calls.append(len(items))
        return super().rewrap_many(items, key_id=key_id)

    def rotate_key(self, *args, **kwargs):
        self._check()
        return super().rotate_key(*args, **kwargs)

    def health_check(self):
        status = super().health_check()
        if self.outage_flag.exists():
            return type(status)(healthy=False, provider=self.name, latency_ms=status.latency_ms, detail="outage flag present")
        return status
