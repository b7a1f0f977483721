"""The domain: what the product talks about, shared by the brain, the coordinator and the adapters.

Requests and SLOs (:mod:`.request`), instances as adapters report them (:mod:`.instance`), what
happened to a request (:mod:`.outcome`), predicted distributions (:mod:`.distributions`), the step
cost model (:mod:`.costmodel`), plans and serving operations (:mod:`.plan`), request groups
(:mod:`.groups`). Plain data and pure functions: no plugin manager, no clock, no I/O.
"""
