"""Any OpenAI-compatible server as a QLM instance, as a black box (``qlm instance --backend openai``).

SGLang, TGI, TensorRT-LLM's server, llama.cpp's server, or vLLM without the QLM scheduler: an agent
next to the server pulls work from the coordinator while fewer requests are in flight than a
concurrency limit it learns from the latency it observes, sends them to the server, and streams the
tokens back. It reads the server's Prometheus metrics when there are any, evicts by aborting a
request (the coordinator queues it again; the KV and the server's work on it are lost, the tokens
already delivered are kept and the next attempt continues after them), and loads or unloads models
through commands or HTTP calls given in its settings.
"""

from qlm_plugin.adapters.openai.engine_link import OpenAIEngineLink, OpenAISettings
from qlm_plugin.adapters.openai.limiter import ConcurrencyLimiter

__all__ = ["ConcurrencyLimiter", "OpenAIEngineLink", "OpenAISettings"]
