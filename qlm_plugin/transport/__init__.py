"""Both sides of the control plane, apart from the coordinator: the instance agent an adapter runs
beside its engine (:mod:`.agent`), the asyncio gRPC client (:mod:`.client`), and the calls made to
OpenAI-compatible servers beyond generation (:mod:`.openai_client`)."""
