"""The QLM brain, in roles with one contract each (:mod:`.contracts`): the global queue, the length
predictor, the waiting-time estimator, the planner, admission and the LSO executor, composed by the
queue manager (:mod:`.queue_manager`) behind the hooks. The same code runs in the simulator, in the
coordinator and inside vLLM's scheduler; it works on plain request objects and takes the time as an
argument (``now``), never from a clock of its own.
"""
