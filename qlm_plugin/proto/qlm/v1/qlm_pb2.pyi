from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SLO(_message.Message):
    __slots__ = ("ttft_ms", "e2e_ms", "slo_class", "priority")
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    E2E_MS_FIELD_NUMBER: _ClassVar[int]
    SLO_CLASS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    ttft_ms: float
    e2e_ms: float
    slo_class: str
    priority: int
    def __init__(self, ttft_ms: _Optional[float] = ..., e2e_ms: _Optional[float] = ..., slo_class: _Optional[str] = ..., priority: _Optional[int] = ...) -> None: ...

class RequestSpec(_message.Message):
    __slots__ = ("request_id", "model", "prompt", "prompt_tokens", "max_tokens", "slo", "tenant", "reject_if_late", "sampling", "idempotency_key", "true_output_tokens", "operation", "prompt_token_ids", "chat_messages", "service_tier", "response_echo", "choices", "choice", "prompt_only", "from_http")
    class SamplingEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SLO_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    REJECT_IF_LATE_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    TRUE_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    CHAT_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    SERVICE_TIER_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_ECHO_FIELD_NUMBER: _ClassVar[int]
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    CHOICE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_ONLY_FIELD_NUMBER: _ClassVar[int]
    FROM_HTTP_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    prompt: str
    prompt_tokens: int
    max_tokens: int
    slo: SLO
    tenant: str
    reject_if_late: bool
    sampling: _containers.ScalarMap[str, str]
    idempotency_key: str
    true_output_tokens: int
    operation: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    chat_messages: str
    service_tier: str
    response_echo: str
    choices: int
    choice: int
    prompt_only: bool
    from_http: bool
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., prompt: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., max_tokens: _Optional[int] = ..., slo: _Optional[_Union[SLO, _Mapping]] = ..., tenant: _Optional[str] = ..., reject_if_late: _Optional[bool] = ..., sampling: _Optional[_Mapping[str, str]] = ..., idempotency_key: _Optional[str] = ..., true_output_tokens: _Optional[int] = ..., operation: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., chat_messages: _Optional[str] = ..., service_tier: _Optional[str] = ..., response_echo: _Optional[str] = ..., choices: _Optional[int] = ..., choice: _Optional[int] = ..., prompt_only: _Optional[bool] = ..., from_http: _Optional[bool] = ...) -> None: ...

class SubmitRequest(_message.Message):
    __slots__ = ("request",)
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request: RequestSpec
    def __init__(self, request: _Optional[_Union[RequestSpec, _Mapping]] = ...) -> None: ...

class SubmitBatchRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[RequestSpec]
    def __init__(self, requests: _Optional[_Iterable[_Union[RequestSpec, _Mapping]]] = ...) -> None: ...

class SubmitBatchReply(_message.Message):
    __slots__ = ("replies",)
    REPLIES_FIELD_NUMBER: _ClassVar[int]
    replies: _containers.RepeatedCompositeFieldContainer[SubmitReply]
    def __init__(self, replies: _Optional[_Iterable[_Union[SubmitReply, _Mapping]]] = ...) -> None: ...

class SubmitReply(_message.Message):
    __slots__ = ("request_id", "accepted", "can_meet_slo", "estimated_wait_ms", "p_meet", "instance_id", "reason", "duplicate", "code", "field", "retry_after_s")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    CAN_MEET_SLO_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    P_MEET_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    accepted: bool
    can_meet_slo: bool
    estimated_wait_ms: float
    p_meet: float
    instance_id: str
    reason: str
    duplicate: bool
    code: str
    field: str
    retry_after_s: float
    def __init__(self, request_id: _Optional[str] = ..., accepted: _Optional[bool] = ..., can_meet_slo: _Optional[bool] = ..., estimated_wait_ms: _Optional[float] = ..., p_meet: _Optional[float] = ..., instance_id: _Optional[str] = ..., reason: _Optional[str] = ..., duplicate: _Optional[bool] = ..., code: _Optional[str] = ..., field: _Optional[str] = ..., retry_after_s: _Optional[float] = ...) -> None: ...

class RequestRef(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class RequestStatus(_message.Message):
    __slots__ = ("request_id", "state", "instance_id", "attempt", "output_tokens", "output", "ttft_ms", "e2e_ms", "slo_met", "late", "finish_reason", "error", "tool_calls")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    E2E_MS_FIELD_NUMBER: _ClassVar[int]
    SLO_MET_FIELD_NUMBER: _ClassVar[int]
    LATE_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    state: str
    instance_id: str
    attempt: int
    output_tokens: int
    output: str
    ttft_ms: float
    e2e_ms: float
    slo_met: bool
    late: bool
    finish_reason: str
    error: str
    tool_calls: str
    def __init__(self, request_id: _Optional[str] = ..., state: _Optional[str] = ..., instance_id: _Optional[str] = ..., attempt: _Optional[int] = ..., output_tokens: _Optional[int] = ..., output: _Optional[str] = ..., ttft_ms: _Optional[float] = ..., e2e_ms: _Optional[float] = ..., slo_met: _Optional[bool] = ..., late: _Optional[bool] = ..., finish_reason: _Optional[str] = ..., error: _Optional[str] = ..., tool_calls: _Optional[str] = ...) -> None: ...

class CancelReply(_message.Message):
    __slots__ = ("cancelled", "state")
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    cancelled: bool
    state: str
    def __init__(self, cancelled: _Optional[bool] = ..., state: _Optional[str] = ...) -> None: ...

class OutputChunk(_message.Message):
    __slots__ = ("text", "index", "tokens", "finished", "finish_reason", "tool_calls", "logprobs", "prompt_logprobs")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    text: str
    index: int
    tokens: int
    finished: bool
    finish_reason: str
    tool_calls: str
    logprobs: str
    prompt_logprobs: str
    def __init__(self, text: _Optional[str] = ..., index: _Optional[int] = ..., tokens: _Optional[int] = ..., finished: _Optional[bool] = ..., finish_reason: _Optional[str] = ..., tool_calls: _Optional[str] = ..., logprobs: _Optional[str] = ..., prompt_logprobs: _Optional[str] = ...) -> None: ...

class StepTiming(_message.Message):
    __slots__ = ("start", "duration_s", "prefill_tokens", "decode_tokens", "batch_size")
    START_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DECODE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    start: float
    duration_s: float
    prefill_tokens: int
    decode_tokens: int
    batch_size: int
    def __init__(self, start: _Optional[float] = ..., duration_s: _Optional[float] = ..., prefill_tokens: _Optional[int] = ..., decode_tokens: _Optional[int] = ..., batch_size: _Optional[int] = ...) -> None: ...

class StateReport(_message.Message):
    __slots__ = ("instance_id", "session", "models_loaded", "models_warm", "loading_model", "num_running", "num_waiting", "num_swapped", "queued_tokens", "kv_blocks_used", "kv_blocks_total", "max_num_seqs", "step_timings", "notes", "num_waiting_urgent", "running_ids", "waiting_ids", "swapped_ids", "now", "down", "max_num_batched_tokens", "prefill_tokens_pending", "models_servable", "device", "leaving")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    MODELS_LOADED_FIELD_NUMBER: _ClassVar[int]
    MODELS_WARM_FIELD_NUMBER: _ClassVar[int]
    LOADING_MODEL_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    NUM_SWAPPED_FIELD_NUMBER: _ClassVar[int]
    QUEUED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    STEP_TIMINGS_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_URGENT_FIELD_NUMBER: _ClassVar[int]
    RUNNING_IDS_FIELD_NUMBER: _ClassVar[int]
    WAITING_IDS_FIELD_NUMBER: _ClassVar[int]
    SWAPPED_IDS_FIELD_NUMBER: _ClassVar[int]
    NOW_FIELD_NUMBER: _ClassVar[int]
    DOWN_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_BATCHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_PENDING_FIELD_NUMBER: _ClassVar[int]
    MODELS_SERVABLE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    LEAVING_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    session: str
    models_loaded: _containers.RepeatedScalarFieldContainer[str]
    models_warm: _containers.RepeatedScalarFieldContainer[str]
    loading_model: str
    num_running: int
    num_waiting: int
    num_swapped: int
    queued_tokens: int
    kv_blocks_used: int
    kv_blocks_total: int
    max_num_seqs: int
    step_timings: _containers.RepeatedCompositeFieldContainer[StepTiming]
    notes: _containers.RepeatedScalarFieldContainer[str]
    num_waiting_urgent: int
    running_ids: _containers.RepeatedScalarFieldContainer[str]
    waiting_ids: _containers.RepeatedScalarFieldContainer[str]
    swapped_ids: _containers.RepeatedScalarFieldContainer[str]
    now: float
    down: bool
    max_num_batched_tokens: int
    prefill_tokens_pending: int
    models_servable: _containers.RepeatedScalarFieldContainer[str]
    device: str
    leaving: bool
    def __init__(self, instance_id: _Optional[str] = ..., session: _Optional[str] = ..., models_loaded: _Optional[_Iterable[str]] = ..., models_warm: _Optional[_Iterable[str]] = ..., loading_model: _Optional[str] = ..., num_running: _Optional[int] = ..., num_waiting: _Optional[int] = ..., num_swapped: _Optional[int] = ..., queued_tokens: _Optional[int] = ..., kv_blocks_used: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., max_num_seqs: _Optional[int] = ..., step_timings: _Optional[_Iterable[_Union[StepTiming, _Mapping]]] = ..., notes: _Optional[_Iterable[str]] = ..., num_waiting_urgent: _Optional[int] = ..., running_ids: _Optional[_Iterable[str]] = ..., waiting_ids: _Optional[_Iterable[str]] = ..., swapped_ids: _Optional[_Iterable[str]] = ..., now: _Optional[float] = ..., down: _Optional[bool] = ..., max_num_batched_tokens: _Optional[int] = ..., prefill_tokens_pending: _Optional[int] = ..., models_servable: _Optional[_Iterable[str]] = ..., device: _Optional[str] = ..., leaving: _Optional[bool] = ...) -> None: ...

class HeldRequest(_message.Message):
    __slots__ = ("request_id", "attempt")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    attempt: int
    def __init__(self, request_id: _Optional[str] = ..., attempt: _Optional[int] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("instance_id", "backend", "gpu", "capabilities", "state", "held", "endpoint", "agent_id")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    backend: str
    gpu: str
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    state: StateReport
    held: _containers.RepeatedCompositeFieldContainer[HeldRequest]
    endpoint: str
    agent_id: str
    def __init__(self, instance_id: _Optional[str] = ..., backend: _Optional[str] = ..., gpu: _Optional[str] = ..., capabilities: _Optional[_Iterable[str]] = ..., state: _Optional[_Union[StateReport, _Mapping]] = ..., held: _Optional[_Iterable[_Union[HeldRequest, _Mapping]]] = ..., endpoint: _Optional[str] = ..., agent_id: _Optional[str] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("session", "heartbeat_interval_s", "heartbeat_timeout_s", "keep", "abandon")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    ABANDON_FIELD_NUMBER: _ClassVar[int]
    session: str
    heartbeat_interval_s: float
    heartbeat_timeout_s: float
    keep: _containers.RepeatedCompositeFieldContainer[HeldRequest]
    abandon: _containers.RepeatedCompositeFieldContainer[HeldRequest]
    def __init__(self, session: _Optional[str] = ..., heartbeat_interval_s: _Optional[float] = ..., heartbeat_timeout_s: _Optional[float] = ..., keep: _Optional[_Iterable[_Union[HeldRequest, _Mapping]]] = ..., abandon: _Optional[_Iterable[_Union[HeldRequest, _Mapping]]] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("known",)
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    known: bool
    def __init__(self, known: _Optional[bool] = ...) -> None: ...

class PullCredit(_message.Message):
    __slots__ = ("session", "free_slots", "received")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    FREE_SLOTS_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    session: str
    free_slots: int
    received: int
    def __init__(self, session: _Optional[str] = ..., free_slots: _Optional[int] = ..., received: _Optional[int] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("request", "attempt", "urgency", "deadline", "resume_tokens", "resume_text", "ttft_budget_s", "e2e_budget_s", "rank", "trace_context")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    URGENCY_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RESUME_TEXT_FIELD_NUMBER: _ClassVar[int]
    TTFT_BUDGET_S_FIELD_NUMBER: _ClassVar[int]
    E2E_BUDGET_S_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    request: RequestSpec
    attempt: int
    urgency: float
    deadline: float
    resume_tokens: int
    resume_text: str
    ttft_budget_s: float
    e2e_budget_s: float
    rank: _containers.RepeatedScalarFieldContainer[float]
    trace_context: _containers.ScalarMap[str, str]
    def __init__(self, request: _Optional[_Union[RequestSpec, _Mapping]] = ..., attempt: _Optional[int] = ..., urgency: _Optional[float] = ..., deadline: _Optional[float] = ..., resume_tokens: _Optional[int] = ..., resume_text: _Optional[str] = ..., ttft_budget_s: _Optional[float] = ..., e2e_budget_s: _Optional[float] = ..., rank: _Optional[_Iterable[float]] = ..., trace_context: _Optional[_Mapping[str, str]] = ...) -> None: ...

class AssignmentBatch(_message.Message):
    __slots__ = ("assignments",)
    ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    assignments: _containers.RepeatedCompositeFieldContainer[Assignment]
    def __init__(self, assignments: _Optional[_Iterable[_Union[Assignment, _Mapping]]] = ...) -> None: ...

class Command(_message.Message):
    __slots__ = ("command_id", "evict", "swap_in", "load_model", "unload_model", "abort")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    EVICT_FIELD_NUMBER: _ClassVar[int]
    SWAP_IN_FIELD_NUMBER: _ClassVar[int]
    LOAD_MODEL_FIELD_NUMBER: _ClassVar[int]
    UNLOAD_MODEL_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    command_id: str
    evict: Evict
    swap_in: SwapIn
    load_model: LoadModel
    unload_model: UnloadModel
    abort: Abort
    def __init__(self, command_id: _Optional[str] = ..., evict: _Optional[_Union[Evict, _Mapping]] = ..., swap_in: _Optional[_Union[SwapIn, _Mapping]] = ..., load_model: _Optional[_Union[LoadModel, _Mapping]] = ..., unload_model: _Optional[_Union[UnloadModel, _Mapping]] = ..., abort: _Optional[_Union[Abort, _Mapping]] = ...) -> None: ...

class Evict(_message.Message):
    __slots__ = ("request_id", "mode", "for_request_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    FOR_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    mode: str
    for_request_id: str
    def __init__(self, request_id: _Optional[str] = ..., mode: _Optional[str] = ..., for_request_id: _Optional[str] = ...) -> None: ...

class SwapIn(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class LoadModel(_message.Message):
    __slots__ = ("model", "target")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    model: str
    target: str
    def __init__(self, model: _Optional[str] = ..., target: _Optional[str] = ...) -> None: ...

class UnloadModel(_message.Message):
    __slots__ = ("model", "keep_warm")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    KEEP_WARM_FIELD_NUMBER: _ClassVar[int]
    model: str
    keep_warm: bool
    def __init__(self, model: _Optional[str] = ..., keep_warm: _Optional[bool] = ...) -> None: ...

class Abort(_message.Message):
    __slots__ = ("request_id", "attempt")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    attempt: int
    def __init__(self, request_id: _Optional[str] = ..., attempt: _Optional[int] = ...) -> None: ...

class CommandAck(_message.Message):
    __slots__ = ("session", "command_id", "ok", "error", "wasted_tokens", "transfer_s", "ready_at", "warm")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    WASTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_S_FIELD_NUMBER: _ClassVar[int]
    READY_AT_FIELD_NUMBER: _ClassVar[int]
    WARM_FIELD_NUMBER: _ClassVar[int]
    session: str
    command_id: str
    ok: bool
    error: str
    wasted_tokens: int
    transfer_s: float
    ready_at: float
    warm: bool
    def __init__(self, session: _Optional[str] = ..., command_id: _Optional[str] = ..., ok: _Optional[bool] = ..., error: _Optional[str] = ..., wasted_tokens: _Optional[int] = ..., transfer_s: _Optional[float] = ..., ready_at: _Optional[float] = ..., warm: _Optional[bool] = ...) -> None: ...

class RequestEvent(_message.Message):
    __slots__ = ("request_id", "attempt", "kind", "index", "text", "tokens", "time", "finish_reason", "preemptions", "wasted_tokens", "error", "tool_calls", "logprobs", "prompt_logprobs")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        TOKENS: _ClassVar[RequestEvent.Kind]
        FINISHED: _ClassVar[RequestEvent.Kind]
        EVICTED: _ClassVar[RequestEvent.Kind]
        SWAPPED_IN: _ClassVar[RequestEvent.Kind]
        FAILED: _ClassVar[RequestEvent.Kind]
        REQUEUED: _ClassVar[RequestEvent.Kind]
        REFUSED: _ClassVar[RequestEvent.Kind]
    TOKENS: RequestEvent.Kind
    FINISHED: RequestEvent.Kind
    EVICTED: RequestEvent.Kind
    SWAPPED_IN: RequestEvent.Kind
    FAILED: RequestEvent.Kind
    REQUEUED: RequestEvent.Kind
    REFUSED: RequestEvent.Kind
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    WASTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    attempt: int
    kind: RequestEvent.Kind
    index: int
    text: str
    tokens: int
    time: float
    finish_reason: str
    preemptions: int
    wasted_tokens: int
    error: str
    tool_calls: str
    logprobs: str
    prompt_logprobs: str
    def __init__(self, request_id: _Optional[str] = ..., attempt: _Optional[int] = ..., kind: _Optional[_Union[RequestEvent.Kind, str]] = ..., index: _Optional[int] = ..., text: _Optional[str] = ..., tokens: _Optional[int] = ..., time: _Optional[float] = ..., finish_reason: _Optional[str] = ..., preemptions: _Optional[int] = ..., wasted_tokens: _Optional[int] = ..., error: _Optional[str] = ..., tool_calls: _Optional[str] = ..., logprobs: _Optional[str] = ..., prompt_logprobs: _Optional[str] = ...) -> None: ...

class EventBatch(_message.Message):
    __slots__ = ("session", "seq", "events", "credit")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    CREDIT_FIELD_NUMBER: _ClassVar[int]
    session: str
    seq: int
    events: _containers.RepeatedCompositeFieldContainer[RequestEvent]
    credit: PullCredit
    def __init__(self, session: _Optional[str] = ..., seq: _Optional[int] = ..., events: _Optional[_Iterable[_Union[RequestEvent, _Mapping]]] = ..., credit: _Optional[_Union[PullCredit, _Mapping]] = ...) -> None: ...

class ReportAck(_message.Message):
    __slots__ = ("seq", "known", "takes_credit")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    TAKES_CREDIT_FIELD_NUMBER: _ClassVar[int]
    seq: int
    known: bool
    takes_credit: bool
    def __init__(self, seq: _Optional[int] = ..., known: _Optional[bool] = ..., takes_credit: _Optional[bool] = ...) -> None: ...

class EvictOrder(_message.Message):
    __slots__ = ("request_id", "mode")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    mode: str
    def __init__(self, request_id: _Optional[str] = ..., mode: _Optional[str] = ...) -> None: ...

class EvictReply(_message.Message):
    __slots__ = ("ordered", "instance_id", "reason")
    ORDERED_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ordered: bool
    instance_id: str
    reason: str
    def __init__(self, ordered: _Optional[bool] = ..., instance_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class QueueQuery(_message.Message):
    __slots__ = ("model", "limit")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    model: str
    limit: int
    def __init__(self, model: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class QueuedRequest(_message.Message):
    __slots__ = ("request_id", "model", "slo_class", "tenant", "state", "instance_id", "age_s", "deadline", "late")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SLO_CLASS_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    AGE_S_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    LATE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    slo_class: str
    tenant: str
    state: str
    instance_id: str
    age_s: float
    deadline: float
    late: bool
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., slo_class: _Optional[str] = ..., tenant: _Optional[str] = ..., state: _Optional[str] = ..., instance_id: _Optional[str] = ..., age_s: _Optional[float] = ..., deadline: _Optional[float] = ..., late: _Optional[bool] = ...) -> None: ...

class QueueSnapshot(_message.Message):
    __slots__ = ("queued", "dispatched", "requests")
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    DISPATCHED_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    queued: int
    dispatched: int
    requests: _containers.RepeatedCompositeFieldContainer[QueuedRequest]
    def __init__(self, queued: _Optional[int] = ..., dispatched: _Optional[int] = ..., requests: _Optional[_Iterable[_Union[QueuedRequest, _Mapping]]] = ...) -> None: ...

class PlanQuery(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PlannedQueue(_message.Message):
    __slots__ = ("instance_id", "request_ids")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, instance_id: _Optional[str] = ..., request_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class PlanSnapshot(_message.Message):
    __slots__ = ("made_at", "solver", "queues", "actions")
    MADE_AT_FIELD_NUMBER: _ClassVar[int]
    SOLVER_FIELD_NUMBER: _ClassVar[int]
    QUEUES_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    made_at: float
    solver: str
    queues: _containers.RepeatedCompositeFieldContainer[PlannedQueue]
    actions: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, made_at: _Optional[float] = ..., solver: _Optional[str] = ..., queues: _Optional[_Iterable[_Union[PlannedQueue, _Mapping]]] = ..., actions: _Optional[_Iterable[str]] = ...) -> None: ...

class InstancesQuery(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InstanceSnapshot(_message.Message):
    __slots__ = ("instance_id", "backend", "gpu", "healthy", "state", "dispatched", "last_heartbeat_age_s", "endpoint")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DISPATCHED_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_AGE_S_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    backend: str
    gpu: str
    healthy: bool
    state: StateReport
    dispatched: int
    last_heartbeat_age_s: float
    endpoint: str
    def __init__(self, instance_id: _Optional[str] = ..., backend: _Optional[str] = ..., gpu: _Optional[str] = ..., healthy: _Optional[bool] = ..., state: _Optional[_Union[StateReport, _Mapping]] = ..., dispatched: _Optional[int] = ..., last_heartbeat_age_s: _Optional[float] = ..., endpoint: _Optional[str] = ...) -> None: ...

class InstancesSnapshot(_message.Message):
    __slots__ = ("instances",)
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    instances: _containers.RepeatedCompositeFieldContainer[InstanceSnapshot]
    def __init__(self, instances: _Optional[_Iterable[_Union[InstanceSnapshot, _Mapping]]] = ...) -> None: ...

class RelayCalls(_message.Message):
    __slots__ = ("calls",)
    CALLS_FIELD_NUMBER: _ClassVar[int]
    calls: _containers.RepeatedCompositeFieldContainer[RelayCall]
    def __init__(self, calls: _Optional[_Iterable[_Union[RelayCall, _Mapping]]] = ...) -> None: ...

class RelayCall(_message.Message):
    __slots__ = ("seq", "submit", "cancel", "cancel_reason", "trace", "streams")
    class TraceEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SEQ_FIELD_NUMBER: _ClassVar[int]
    SUBMIT_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    CANCEL_REASON_FIELD_NUMBER: _ClassVar[int]
    TRACE_FIELD_NUMBER: _ClassVar[int]
    STREAMS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    submit: RequestSpec
    cancel: str
    cancel_reason: str
    trace: _containers.ScalarMap[str, str]
    streams: bool
    def __init__(self, seq: _Optional[int] = ..., submit: _Optional[_Union[RequestSpec, _Mapping]] = ..., cancel: _Optional[str] = ..., cancel_reason: _Optional[str] = ..., trace: _Optional[_Mapping[str, str]] = ..., streams: _Optional[bool] = ...) -> None: ...

class RelayEvents(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[RelayEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[RelayEvent, _Mapping]]] = ...) -> None: ...

class RelayEvent(_message.Message):
    __slots__ = ("seq", "accepted", "refused", "chunk", "finished")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    seq: int
    accepted: RelayJob
    refused: RelayRefusal
    chunk: RelayChunk
    finished: RelayJob
    def __init__(self, seq: _Optional[int] = ..., accepted: _Optional[_Union[RelayJob, _Mapping]] = ..., refused: _Optional[_Union[RelayRefusal, _Mapping]] = ..., chunk: _Optional[_Union[RelayChunk, _Mapping]] = ..., finished: _Optional[_Union[RelayJob, _Mapping]] = ...) -> None: ...

class RelayRefusal(_message.Message):
    __slots__ = ("code", "field", "message", "has_estimate", "wait_mean_s", "p_meet", "retry_after_s")
    CODE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    HAS_ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    WAIT_MEAN_S_FIELD_NUMBER: _ClassVar[int]
    P_MEET_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    code: str
    field: str
    message: str
    has_estimate: bool
    wait_mean_s: float
    p_meet: float
    retry_after_s: float
    def __init__(self, code: _Optional[str] = ..., field: _Optional[str] = ..., message: _Optional[str] = ..., has_estimate: _Optional[bool] = ..., wait_mean_s: _Optional[float] = ..., p_meet: _Optional[float] = ..., retry_after_s: _Optional[float] = ...) -> None: ...

class RelayChunk(_message.Message):
    __slots__ = ("request_id", "chunk")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    chunk: OutputChunk
    def __init__(self, request_id: _Optional[str] = ..., chunk: _Optional[_Union[OutputChunk, _Mapping]] = ...) -> None: ...

class RelayJob(_message.Message):
    __slots__ = ("request_id", "model", "prompt_tokens", "max_tokens", "arrival_time", "ttft_deadline", "e2e_deadline", "slo_class", "priority", "weight", "tenant", "duplicate", "has_admission", "can_meet_slo", "planned_instance", "wait_mean_s", "p_meet", "state", "text", "tokens", "first_token_at", "finished_at", "finish_reason", "error", "instance_id", "attempt", "tool_calls", "logprobs", "prompt_logprobs", "halted")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ARRIVAL_TIME_FIELD_NUMBER: _ClassVar[int]
    TTFT_DEADLINE_FIELD_NUMBER: _ClassVar[int]
    E2E_DEADLINE_FIELD_NUMBER: _ClassVar[int]
    SLO_CLASS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    HAS_ADMISSION_FIELD_NUMBER: _ClassVar[int]
    CAN_MEET_SLO_FIELD_NUMBER: _ClassVar[int]
    PLANNED_INSTANCE_FIELD_NUMBER: _ClassVar[int]
    WAIT_MEAN_S_FIELD_NUMBER: _ClassVar[int]
    P_MEET_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    HALTED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    prompt_tokens: int
    max_tokens: int
    arrival_time: float
    ttft_deadline: float
    e2e_deadline: float
    slo_class: str
    priority: int
    weight: float
    tenant: str
    duplicate: bool
    has_admission: bool
    can_meet_slo: bool
    planned_instance: str
    wait_mean_s: float
    p_meet: float
    state: str
    text: str
    tokens: int
    first_token_at: float
    finished_at: float
    finish_reason: str
    error: str
    instance_id: str
    attempt: int
    tool_calls: str
    logprobs: str
    prompt_logprobs: str
    halted: bool
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., max_tokens: _Optional[int] = ..., arrival_time: _Optional[float] = ..., ttft_deadline: _Optional[float] = ..., e2e_deadline: _Optional[float] = ..., slo_class: _Optional[str] = ..., priority: _Optional[int] = ..., weight: _Optional[float] = ..., tenant: _Optional[str] = ..., duplicate: _Optional[bool] = ..., has_admission: _Optional[bool] = ..., can_meet_slo: _Optional[bool] = ..., planned_instance: _Optional[str] = ..., wait_mean_s: _Optional[float] = ..., p_meet: _Optional[float] = ..., state: _Optional[str] = ..., text: _Optional[str] = ..., tokens: _Optional[int] = ..., first_token_at: _Optional[float] = ..., finished_at: _Optional[float] = ..., finish_reason: _Optional[str] = ..., error: _Optional[str] = ..., instance_id: _Optional[str] = ..., attempt: _Optional[int] = ..., tool_calls: _Optional[str] = ..., logprobs: _Optional[str] = ..., prompt_logprobs: _Optional[str] = ..., halted: _Optional[bool] = ...) -> None: ...
