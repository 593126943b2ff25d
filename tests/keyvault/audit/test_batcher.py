"""AppendBatcher: one process's concurrent appends made as one call, each caller answered with its own results.

Real threads; the append function stands in for the database (the PostgreSQL path is tested in
test_own_statement_rounds.py).
"""

import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyvault.audit.batcher import AppendBatcher


class Gate:
    """An append function that records its rounds and, while closed, holds the round in progress."""

    def __init__(self, fail_on=None):
        self.rounds: list[list] = []
        self.open = threading.Event()
        self.open.set()
        self.entered = threading.Event()
        self.fail_on = fail_on

    def __call__(self, items: list) -> list:
        self.entered.set()
        self.open.wait(timeout=30)
        self.rounds.append(list(items))
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError(f"refused {self.fail_on}")
        return [f"appended {item}" for item in items]


def _wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def _submit_all(batcher: AppendBatcher, payloads: list[list]) -> tuple[dict, dict, list[threading.Thread]]:
    results, errors = {}, {}

    def submit(number: int) -> None:
        try:
            results[number] = batcher.submit(payloads[number])
        except Exception as exc:  # compared below
            errors[number] = exc

    threads = [threading.Thread(target=submit, args=(n,)) for n in range(len(payloads))]
    for thread in threads:
        thread.start()
    return results, errors, threads


def test_a_lone_caller_appends_at_once_in_a_round_of_its_own():
    gate = Gate()
    batcher = AppendBatcher(gate)
    assert batcher.submit(["a", "b"]) == ["appended a", "appended b"]
    assert batcher.submit(["c"]) == ["appended c"]
    assert gate.rounds == [["a", "b"], ["c"]]
    assert (batcher.rounds, batcher.events) == (2, 3)


def test_callers_arriving_during_a_round_are_appended_together_in_the_next_each_with_its_own_results():
    gate = Gate()
    batcher = AppendBatcher(gate)
    gate.open.clear()
    # given a leader whose round is in progress (held at the gate)
    first, first_errors, first_threads = _submit_all(batcher, [["lead"]])
    assert gate.entered.wait(10)
    # when 15 more callers arrive meanwhile, one to three events each
    payloads = [[f"{n}.{i}" for i in range(1 + n % 3)] for n in range(15)]
    results, errors, threads = _submit_all(batcher, payloads)
    _wait_until(lambda: len(batcher._queue) == 15)
    gate.open.set()
    for thread in first_threads + threads:
        thread.join(timeout=30)

    # then the leader's round held its own event alone, and one more round held all the others, in arrival order
    assert first == {0: ["appended lead"]} and not first_errors and not errors
    assert len(gate.rounds) == 2 and gate.rounds[0] == ["lead"]
    assert sorted(gate.rounds[1]) == sorted(item for payload in payloads for item in payload)
    # and each caller got exactly the results of its own events, in its order
    assert results == {n: [f"appended {item}" for item in payloads[n]] for n in range(15)}
    assert (batcher.rounds, batcher.events) == (2, 1 + sum(map(len, payloads)))


def test_a_failed_round_fails_every_caller_in_it_and_only_them():
    gate = Gate(fail_on="poison")
    batcher = AppendBatcher(gate)
    gate.open.clear()
    _, lead_errors, lead_threads = _submit_all(batcher, [["lead"]])
    assert gate.entered.wait(10)
    payloads = [["x"], ["poison"], ["y", "z"]]
    results, errors, threads = _submit_all(batcher, payloads)
    _wait_until(lambda: len(batcher._queue) == 3)
    gate.open.set()
    for thread in lead_threads + threads:
        thread.join(timeout=30)

    # the round with the refused event raised for all three callers in it, each its own exception
    assert not lead_errors and results == {}
    assert sorted(errors) == [0, 1, 2]
    assert all(isinstance(exc, ValueError) and str(exc) == "refused poison" for exc in errors.values())
    assert len({id(exc) for exc in errors.values()}) == 3
    # and the batcher goes on: the next caller leads a round of its own
    assert batcher.submit(["after"]) == ["appended after"]
    assert batcher._leading is False and batcher._queue == []


def test_a_result_count_unlike_the_events_fails_the_round():
    batcher = AppendBatcher(lambda items: items[:-1])
    with pytest.raises(RuntimeError, match="result count"):
        batcher.submit(["a", "b"])
    assert batcher._leading is False


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.integers(), min_size=1, max_size=4), min_size=1, max_size=24))
def test_every_caller_gets_exactly_its_own_results_however_the_rounds_fall(payloads):
    seen = []

    def append(items):
        time.sleep(0.001)  # long enough for callers to queue behind a round
        seen.extend(items)
        return [("done", item) for item in items]

    batcher = AppendBatcher(append)
    tagged = [[(n, item) for item in payload] for n, payload in enumerate(payloads)]
    results, errors, threads = _submit_all(batcher, tagged)
    for thread in threads:
        thread.join(timeout=30)
    assert not errors
    assert results == {n: [("done", item) for item in payload] for n, payload in enumerate(tagged)}
    assert sorted(seen) == sorted(item for payload in tagged for item in payload)  # each appended once
    assert batcher.events == len(seen) and batcher._leading is False
