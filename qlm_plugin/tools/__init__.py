"""The tools behind the ``qlm`` commands that study a fleet offline: ``qlm simulate``
(:mod:`.simulate`), ``qlm bench`` (:mod:`.bench`), ``qlm plan-capacity`` (:mod:`.capacity`),
``qlm cost-check`` (:mod:`.costcheck`), the metrics they report (:mod:`.metrics`), and the outcome
digests that hold a refactoring to unchanged behaviour (:mod:`.outcomes`)."""
