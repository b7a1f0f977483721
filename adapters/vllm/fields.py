"""A request's QLM fields as the engine sees them: from vLLM's ``priority`` and ``vllm_xargs``
(``sampling_params.extra_args``). Flat keys, as the OpenAI API's ``vllm_xargs`` allows:

=====================  ==================================================================
``qlm_id``             the coordinator's request id (evictions it orders name this id)
``qlm_attempt``        the coordinator's dispatch number
``qlm_class``          SLO class (``interactive``, ``batch``, ...)
``qlm_ttft_ms``        milliseconds after the request reached the engine by which the first
                       token is due (the coordinator sends the time left, so the engine's clock
                       need not agree with the coordinator's)
``qlm_e2e_ms``         the same for the end of the request
``qlm_ttft_deadline``  unix seconds by which the first token is due (clients on a common clock)
``qlm_e2e_deadline``   unix seconds by which the request must finish
``qlm_priority``       the client's priority, lower first; it moves a request without an SLO by
                       up to a minute either way (so it neither passes a due request nor
                       starves); without it, vLLM's own ``priority`` field is taken
``qlm_tenant``
``qlm_predicted_tokens``  the coordinator's predicted output length (median)
``qlm_predicted_q90``  its 90th percentile (the engine uses both until its own predictor is
                       warm for the request's class)
=====================  ==================================================================

Offline ``LLM.generate`` may also pass them nested: ``extra_args={"qlm": {...}}``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("qlm_plugin.adapters.vllm")


@dataclass(frozen=True, slots=True)
class QLMFields:
    qlm_id: str | None = None
    attempt: int = 0
    slo_class: str = ""
    ttft_deadline: float | None = None
    e2e_deadline: float | None = None
    tenant: str = ""
    predicted_tokens: float | None = None
    predicted_q90: float | None = None
    priority: int = 0  # the client's own vLLM priority (a tie-break)

    @property
    def has_slo(self) -> bool:
        return self.ttft_deadline is not None or self.e2e_deadline is not None


_TEXT_FIELDS = frozenset({"qlm_id", "qlm_class", "qlm_tenant"})
_POSITIVE_FIELDS = frozenset(
    {
        "qlm_ttft_ms",
        "qlm_e2e_ms",
        "qlm_ttft_deadline",
        "qlm_e2e_deadline",
        "qlm_predicted_tokens",
        "qlm_predicted_q90",
    }
)

#: Bounds of the integer fields (the coordinator's int32 range; a larger attempt cannot be reported).
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def _num(value: Any) -> float | None:
    """A finite positive number, or None (bools, strings that are no number, inf, nan, ints too large
    for a float: all malformed)."""
    if isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return x if math.isfinite(x) and x > 0 else None


def _int(value: Any, low: int, high: int) -> int | None:
    """An integral value clamped to [low, high], or None when malformed."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return min(max(value, low), high)
    try:
        x = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return int(min(max(x, low), high)) if math.isfinite(x) else None


def _hint(value: Any, max_tokens: int | None) -> float | None:
    x = _num(value)
    if x is None:
        return None
    return min(max(x, 1.0), float(max_tokens)) if max_tokens and max_tokens > 0 else max(x, 1.0)


#: The fields the engine reads (any other ``qlm_`` key is a mistake: logged, once per key).
KNOWN_FIELDS = frozenset(
    {
        "qlm_id",
        "qlm_attempt",
        "qlm_class",
        "qlm_ttft_ms",
        "qlm_e2e_ms",
        "qlm_ttft_deadline",
        "qlm_e2e_deadline",
        "qlm_priority",
        "qlm_tenant",
        "qlm_predicted_tokens",
        "qlm_predicted_q90",
    }
)
_warned: set[str] = set()


def _warn_once(key: str, why: str) -> None:
    """A field the engine cannot use: the request runs, at default urgency, and the operator is
    told once per field (a client sending "soon" for a TTFT loses its SLO without a word else)."""
    if key not in _warned and len(_warned) < 64:
        _warned.add(key)
        log.warning("QLM: %s %s; the request runs without it (logged once per field)", key, why)


def parse_fields(
    extra_args: Mapping[str, Any] | None,
    *,
    priority: int,
    arrival_time: float,
    max_tokens: int | None = None,
) -> QLMFields:
    """Malformed values are ignored (the request still runs, at default urgency); numbers are taken
    only when finite, integers clamped to int32, predicted lengths to [1, ``max_tokens``]."""
    args: dict[str, Any] = {}
    if isinstance(extra_args, Mapping):
        nested = extra_args.get("qlm")
        if isinstance(nested, Mapping):
            args.update(
                {f"qlm_{k}" if not str(k).startswith("qlm_") else str(k): v for k, v in nested.items()}
            )
        args.update({k: v for k, v in extra_args.items() if isinstance(k, str) and k.startswith("qlm_")})
        for key, value in args.items():
            if key not in KNOWN_FIELDS:
                _warn_once(
                    key, f"is not a field the engine reads (it reads {', '.join(sorted(KNOWN_FIELDS))})"
                )
            elif (
                value is not None
                and key not in _TEXT_FIELDS
                and _num(value) is None
                and _int(value, 0, 1) is None
            ):
                _warn_once(key, f"must be a finite number, got {value!r:.40}")
            elif key in _POSITIVE_FIELDS and _num(value) is None:
                _warn_once(key, f"must be a number above 0, got {value!r:.40}")
    ttft = _num(args.get("qlm_ttft_deadline"))
    e2e = _num(args.get("qlm_e2e_deadline"))
    if ttft is None and (ms := _num(args.get("qlm_ttft_ms"))) is not None:
        ttft = arrival_time + ms / 1000
    if e2e is None and (ms := _num(args.get("qlm_e2e_ms"))) is not None:
        e2e = arrival_time + ms / 1000
    qid = args.get("qlm_id")
    own = _int(priority, INT32_MIN, INT32_MAX)
    client = _int(args.get("qlm_priority"), INT32_MIN, INT32_MAX)  # malformed: the engine's own stands
    return QLMFields(
        qlm_id=str(qid) if qid is not None else None,
        attempt=_int(args.get("qlm_attempt"), 0, INT32_MAX) or 0,
        slo_class=str(args.get("qlm_class", "")),
        ttft_deadline=ttft,
        e2e_deadline=e2e,
        tenant=str(args.get("qlm_tenant", "")),
        predicted_tokens=_hint(args.get("qlm_predicted_tokens"), max_tokens),
        predicted_q90=_hint(args.get("qlm_predicted_q90"), max_tokens),
        priority=client if client is not None else (own or 0),
    )
