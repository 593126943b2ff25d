"""The rotation engine: one state machine for every run, with what is rotated behind a driver.

* :mod:`.states` — which state may follow which, and the one function that moves a run;
* :mod:`.dispatch` — how work reaches a worker (the outbox and Celery, or this process in tests and ``--inline``);
* :mod:`.runs` — start, approve, cancel, roll back, resume and execute a run;
* :mod:`.rewrap` — partitions and batches of data keys, for drivers that rewrap;
* :mod:`.leases` — who holds which partition until when, and taking over a dead worker's;
* :mod:`.recovery` — the frequent beat job: the outbox, expired leases, stalled runs;
* :mod:`.sweep` — the minute's beat job: due policies, retirements, expiring secrets;
* :mod:`.policies` — a target's rotation policy;
* :mod:`.drivers` — KEK rotation, provider migration, managed secrets.

Drivers never import the engine: it lends them the callables they need (:class:`.drivers.base.Hooks`).
``rotation.services`` is the public face the rest of the project imports.
"""
