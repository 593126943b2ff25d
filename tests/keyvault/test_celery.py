"""The Celery application's process set-up."""

from __future__ import annotations

import gc

from celery.signals import worker_process_init

from keyvault import celery


def test_a_worker_process_freezes_what_it_holds_from_startup_out_of_the_collector():
    # given the collector with nothing frozen
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    try:
        # when a worker process starts (the receiver Celery calls in each pool process, called here alone:
        # the signal's other receivers reset connections and meters)
        celery._freeze_startup_objects()

        # then every object alive then is frozen, and objects made later are still collected
        assert gc.get_freeze_count() > 10_000
        assert gc.isenabled()
    finally:
        gc.unfreeze()
    assert celery._freeze_startup_objects in [receiver() for _, receiver in worker_process_init.receivers]
