"""Both sides of the control plane, apart from the coordinator: the instance agent an adapter runs
beside its engine (:mod:`.agent`), the asyncio gRPC client (:mod:`.client`), and the calls made to
OpenAI-compatible servers beyond generation (:mod:`.openai_client`)."""

#: The largest gRPC message a client of the coordinator takes, as its server does
#: (``grpc.max_receive_message_length`` in ``coordinator.server.GRPC_OPTIONS``): gRPC's default,
#: 4 MiB, refuses a long output or a batch of long prompts.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
