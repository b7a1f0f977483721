"""The test run's defaults, inherited by every process the tests start.

- ``QLM_HTTP_WORKERS``: the suite runs the HTTP front door in the core process unless told
  otherwise (``QLM_HTTP_WORKERS=2 python -m pytest`` runs it on two worker processes), so that its
  results do not depend on the machine's core count.
- ``VLLM_ENABLE_V1_MULTIPROCESSING=0``: a vLLM-CPU engine runs its model in the engine-core process
  instead of one more worker process (vLLM's CPU platform picks its single-process executor then;
  the API server and the engine core stay separate processes, and the scheduler is the same). One
  process start and import of vLLM less per engine: about 10 s each here, and the suite starts
  about fifteen engines. ``VLLM_ENABLE_V1_MULTIPROCESSING=1 python -m pytest`` runs them as
  deployed.
"""

import os

os.environ.setdefault("QLM_HTTP_WORKERS", "0")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
