"""The provider meter on its own: every call lands in exactly one bucket, from any number of threads.

(Metrics through the registry and ``/metrics`` are in ``tests/keyvault/ops/test_metrics.py``.)
"""

import threading
import time

from prometheus_client import REGISTRY

from keyvault.kms.metrics import meter


def sample(name: str, provider: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, {"provider": provider, "operation": "decrypt", **labels}) or 0.0


def test_durations_land_in_their_buckets_and_the_sum():
    calls = meter("meter-buckets", "decrypt")
    now = time.perf_counter()

    for seconds in (0.0001, 0.0004, 0.003, 0.2, 45.0):
        calls.observe(now - seconds)

    bucket = "keyvault_kms_operation_duration_seconds_bucket"
    assert sample(bucket, "meter-buckets", le="0.0005") == 2
    assert sample(bucket, "meter-buckets", le="0.005") == 3
    assert sample(bucket, "meter-buckets", le="0.25") == 4
    assert sample(bucket, "meter-buckets", le="30.0") == 4
    assert sample(bucket, "meter-buckets", le="+Inf") == 5
    assert sample("keyvault_kms_operations_total", "meter-buckets") == 5
    assert 45.2 < sample("keyvault_kms_operation_duration_seconds_sum", "meter-buckets") < 45.3


def test_a_duration_on_a_bound_counts_in_that_bucket_and_folds_keep_adding():
    """``le`` means at most: a duration equal to a bound is in its bucket, never the next (the fold bisects)."""
    from keyvault.kms.metrics import LATENCY_BUCKETS

    calls = meter("meter-bounds", "decrypt")
    bucket = "keyvault_kms_operation_duration_seconds_bucket"
    for round_ in range(2):  # the second fold adds to what the first one counted
        calls.pending.extend(LATENCY_BUCKETS)
        calls.pending.extend(bound * 1.0001 for bound in LATENCY_BUCKETS)
        calls.fold()
        assert not calls.pending
        for index, bound in enumerate(LATENCY_BUCKETS):
            # each bound itself, and the step above every lower bound
            assert sample(bucket, "meter-bounds", le=str(bound)) == (2 * index + 1) * (round_ + 1)
        assert sample(bucket, "meter-bounds", le="+Inf") == 2 * len(LATENCY_BUCKETS) * (round_ + 1)


def test_no_call_is_lost_between_threads():
    calls = meter("meter-threads", "decrypt")
    threads, per_thread = 8, 20_000
    start = threading.Barrier(threads)

    def hammer() -> None:
        start.wait()
        for _ in range(per_thread):
            calls.observe(time.perf_counter())

    workers = [threading.Thread(target=hammer) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()

    assert sample("keyvault_kms_operations_total", "meter-threads") == threads * per_thread
    assert sample("keyvault_kms_operation_duration_seconds_count", "meter-threads") == threads * per_thread


def test_errors_are_counted_apart_from_calls():
    calls = meter("meter-errors", "decrypt")

    calls.count_error("InvalidCiphertext")
    calls.count_error("InvalidCiphertext")
    calls.count_error("ProviderUnavailable")

    assert sample("keyvault_kms_errors_total", "meter-errors", error="InvalidCiphertext") == 2
    assert sample("keyvault_kms_errors_total", "meter-errors", error="ProviderUnavailable") == 1
    assert sample("keyvault_kms_operations_total", "meter-errors") == 0
