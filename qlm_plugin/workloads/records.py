"""Workloads: real request traces, reshaping them, synthetic arrivals, and turning records into requests.

A workload is a list of :class:`TraceRecord` (arrival time, prompt length, true output length), sorted
by arrival. Sources are the Azure LLM inference trace 2023 (:func:`load_azure_trace`; small samples ship
with the package, see :func:`packaged_trace_path` and ``qlm_plugin/data/TRACES.md``) and
:func:`synthetic` arrivals. :func:`scale_arrivals`, :func:`window` and :func:`sample` reshape a
workload; :func:`assign` gives each record a model, an SLO class and a tenant and validates it into a
:class:`~qlm_plugin.domain.request.Request`.

Every function that draws random numbers takes an explicit :class:`random.Random`, so a seeded
generator makes the result reproducible.
"""

from __future__ import annotations

import csv
import math
import os
import pathlib
import random
import re
from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.resources import files
from typing import NoReturn

from qlm_plugin.domain.request import ModelSpec, Request, RequestValidationError, SLOClass, make_request

__all__ = [
    "PACKAGED_TRACES",
    "Rejected",
    "Share",
    "TraceError",
    "TraceRecord",
    "assign",
    "load_azure_trace",
    "packaged_trace_path",
    "sample",
    "scale_arrivals",
    "synthetic",
    "window",
]


@dataclass(frozen=True, slots=True)
class TraceRecord:
    """One request of a workload."""

    arrival_s: float
    """Seconds since the first record of the trace (the first record of a loaded trace is at 0.0)."""
    prompt_tokens: int
    output_tokens: int
    """The number of tokens the request really generated (its true output length)."""


class TraceError(ValueError):
    """A trace file could not be read; the message names the file and, where known, line and column.

    Lines are 1-based (the header is line 1).

    E.g. ``trace.csv:17: ContextTokens: not an integer: 'x'``.
    """

    def __init__(
        self, path: str, message: str, *, line: int | None = None, column: str | None = None
    ) -> None:
        where = path if line is None else f"{path}:{line}"
        what = message if column is None else f"{column}: {message}"
        super().__init__(f"{where}: {what}")
        self.path = path
        self.line = line
        self.column = column
        self.reason = message


# --------------------------------------------------------------------------------------------- loading

_TIMESTAMP, _PROMPT, _OUTPUT = "TIMESTAMP", "ContextTokens", "GeneratedTokens"
_COLUMNS = (_TIMESTAMP, _PROMPT, _OUTPUT)


# Timestamps in the Azure traces' form, ``2023-11-16 18:15:46.6805900``, are parsed without datetime on the
# hot path: the epoch second of each minute ("2023-11-16 18:15:") is cached, and only the seconds are parsed.
_PLAIN_DATETIME = re.compile(r"\s*(\d{4}-\d\d-\d\d)[T ](\d\d):(\d\d):(\d\d)(?:\.(\d+))?\s*")
_EPOCH_MINUTES: dict[str, int] = {}


def _parse_datetime(cell: str) -> tuple[int, float]:
    """A date-time -> (whole seconds since the epoch, seconds past them); their sum is the time.

    Naive times are taken as UTC (the Azure traces' clock), so DST never bends the arrival gaps.
    """
    minute = _EPOCH_MINUTES.get(cell[:17])
    if minute is not None:
        tail = cell[17:]  # "46.6805900"
        if (
            len(tail) >= 2
            and tail.isascii()
            and tail[:2].isdigit()
            and (len(tail) == 2 or (tail[2] == "." and tail[3:].isdigit()))
        ):
            seconds = int(tail[:2])
            if seconds < 60:
                # The same split as the parse below (whole seconds, then the fraction), so a time
                # parsed with its minute cached is the same float as one parsed without: the
                # relative times were up to 1e-14 s apart between a process's first and later
                # reads of a trace, enough to move an overloaded simulation by 10 points.
                return minute + seconds, int(tail[3:]) / 10 ** (len(tail) - 3) if len(tail) > 3 else 0.0
    match = _PLAIN_DATETIME.fullmatch(cell)
    if match is None:
        return _parse_iso(cell)
    day, hours, minutes, whole, digits = match.groups()
    h, m, sec = int(hours), int(minutes), int(whole)
    if h > 23 or m > 59 or sec > 59:
        raise ValueError("time out of range")
    minute = int(datetime.fromisoformat(day).replace(tzinfo=timezone.utc).timestamp()) + 3600 * h + 60 * m
    if match.start(1) == 0:
        _EPOCH_MINUTES[cell[:17]] = minute
    return minute + sec, int(digits) / 10 ** len(digits) if digits else 0.0


def _parse_iso(cell: str) -> tuple[int, float]:
    """Any ISO date-time -> (whole seconds since the epoch, fraction of a second).

    The fraction is parsed separately, so any number of fractional digits works on every Python (3.10's
    ``datetime.fromisoformat`` accepts only 3 or 6) and none of the trace's 100 ns resolution is lost. Naive
    times are taken as UTC (the Azure traces' clock), so DST never bends the arrival gaps.
    """
    text = cell.strip()
    frac = 0.0
    colon = text.find(":")
    dot = text.find(".", colon) if colon > 0 else -1
    if dot > 0:  # a fraction of the seconds field (ISO dates and offsets have no '.')
        end = dot + 1
        while end < len(text) and text[end].isdigit():
            end += 1
        digits = text[dot + 1 : end]
        if not digits:
            raise ValueError("empty fraction of a second")
        frac = int(digits) / 10 ** len(digits)
        text = text[:dot] + text[end:]
    if text.endswith(("Z", "z")):  # 3.10's fromisoformat does not accept the 'Z' suffix
        text = text[:-1] + "+00:00"
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp()), frac


def _parse_seconds(cell: str) -> tuple[int, float]:
    value = float(cell)
    if not math.isfinite(value):
        raise ValueError("not finite")
    whole = math.floor(value)
    return whole, value - whole


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def load_azure_trace(path: str | os.PathLike[str]) -> list[TraceRecord]:
    """Read a trace in the Azure LLM inference trace 2023 schema, sorted by arrival, relative to the first.

    The file is a CSV with the header ``TIMESTAMP,ContextTokens,GeneratedTokens`` (other columns are
    allowed and ignored, column order is free). ``TIMESTAMP`` is either an ISO date-time such as
    ``2023-11-16 18:15:46.6805900`` (any number of fractional digits; naive times are UTC) or a number of
    seconds; the kind is fixed by the first data row. Blank lines are skipped. Both token counts must be
    integers >= 1: the Azure 2023 traces have no zero-token rows (the smallest output is 6 tokens), so a
    zero is reported as a broken file rather than silently changed.

    Raises :class:`TraceError` naming the file (and the 1-based line and the column, for a bad cell) when
    the file is missing or unreadable, a required column is missing, a cell is malformed or out of range,
    or the trace has no data rows.
    """
    name = os.fspath(path)
    whole: list[int] = []
    frac: list[float] = []
    prompts: list[int] = []
    outputs: list[int] = []
    reader = None
    try:
        with open(name, encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise TraceError(name, f"empty file: expected the header {','.join(_COLUMNS)}", line=1)
            columns = [cell.strip() for cell in header]
            missing = [column for column in _COLUMNS if column not in columns]
            if missing:
                raise TraceError(
                    name,
                    f"missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                    f"(header: {','.join(columns)!r}; expected {','.join(_COLUMNS)})",
                    line=1,
                )
            i_time, i_prompt, i_output = (columns.index(column) for column in _COLUMNS)
            width = max(i_time, i_prompt, i_output) + 1
            parse_time: Callable[[str], tuple[int, float]] | None = None
            for row in reader:
                if parse_time is None:  # the first data row fixes the kind of timestamp
                    if _is_blank(row):
                        continue
                    if len(row) >= width:
                        parse_time = _parse_seconds if _is_number(row[i_time]) else _parse_datetime
                    else:
                        parse_time = _parse_datetime
                # The fast path checks everything; _diagnose finds what is wrong with a row that fails.
                try:
                    seconds, fraction = parse_time(row[i_time])
                    prompt = int(row[i_prompt])
                    output = int(row[i_output])
                    good = prompt >= 1 and output >= 1
                except (ValueError, IndexError, OverflowError, OSError):
                    good = False
                if not good:
                    if _is_blank(row):
                        continue
                    _diagnose(
                        name, reader.line_num, row, len(columns), (i_time, i_prompt, i_output), parse_time
                    )
                whole.append(seconds)
                frac.append(fraction)
                prompts.append(prompt)
                outputs.append(output)
    except TraceError:
        raise
    except csv.Error as exc:
        at = None if reader is None else reader.line_num
        raise TraceError(name, f"malformed CSV: {exc}", line=at) from exc
    except UnicodeDecodeError as exc:
        raise TraceError(name, f"not UTF-8 text: {exc}") from exc
    except OSError as exc:
        raise TraceError(name, f"cannot read the trace: {exc.strerror or exc}") from exc
    if not whole:
        raise TraceError(name, "no data rows after the header")
    # Relative to the file's first row first (small numbers, so float keeps sub-microsecond precision),
    # then to the earliest arrival.
    w0, f0 = whole[0], frac[0]
    relative = [(w - w0) + (f - f0) for w, f in zip(whole, frac, strict=True)]
    order = sorted(range(len(relative)), key=relative.__getitem__)  # stable: ties keep file order
    first = relative[order[0]]
    return [TraceRecord(relative[i] - first, prompts[i], outputs[i]) for i in order]


def _is_blank(row: list[str]) -> bool:
    return not row or (len(row) == 1 and not row[0].strip())


def _diagnose(
    name: str,
    line: int,
    row: list[str],
    n_columns: int,
    indices: tuple[int, int, int],
    parse_time: Callable[[str], tuple[int, float]],
) -> NoReturn:
    """Raise the :class:`TraceError` for the first bad cell of a row the fast path could not take."""
    i_time, i_prompt, i_output = indices
    if len(row) <= max(indices):
        raise TraceError(name, f"expected {n_columns} columns, got {len(row)}: {row!r}", line=line)
    cell = row[i_time]
    try:
        parse_time(cell)
    except (ValueError, OverflowError, OSError):
        kind = "number of seconds" if parse_time is _parse_seconds else "date-time"
        message = f"not a {kind} (as on the first data row): {cell!r}"
        raise TraceError(name, message, line=line, column=_TIMESTAMP) from None
    for column, index in ((_PROMPT, i_prompt), (_OUTPUT, i_output)):
        cell = row[index]
        try:
            value = int(cell)
        except ValueError:
            raise TraceError(name, f"not an integer: {cell!r}", line=line, column=column) from None
        if value < 0:
            raise TraceError(name, f"negative token count: {value}", line=line, column=column)
        if value < 1:
            raise TraceError(name, f"must be >= 1 token, got {value}", line=line, column=column)
    raise TraceError(name, f"cannot read the row {row!r}", line=line)  # unreachable in practice


#: The trace samples shipped in ``qlm_plugin/data`` (see ``TRACES.md`` there), by name.
PACKAGED_TRACES: Mapping[str, str] = {
    "conv": "azure_conv_sample.csv",
    "code": "azure_code_sample.csv",
}


def packaged_trace_path(name: str) -> pathlib.Path:
    """The path of a packaged trace sample: ``"conv"`` (2,400 rows) or ``"code"`` (1,200 rows).

    Raises ValueError for an unknown name, listing the known ones.
    """
    filename = PACKAGED_TRACES.get(name)
    if filename is None:
        known = ", ".join(repr(known) for known in sorted(PACKAGED_TRACES))
        raise ValueError(f"unknown packaged trace {name!r} (known: {known})")
    resource = files("qlm_plugin.data").joinpath(filename)
    if isinstance(resource, pathlib.Path):
        return resource
    # Installed somewhere that is not a plain directory (a zip): no stable path exists.
    raise RuntimeError(f"packaged trace {filename} is not on the file system ({resource!r})")


# --------------------------------------------------------------------------------------------- transforming


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_positive(name: str, value: float) -> float:
    if not _is_real(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def scale_arrivals(
    records: Sequence[TraceRecord], *, rate_scale: float | None = None, target_rps: float | None = None
) -> list[TraceRecord]:
    """Compress or stretch arrival times; lengths are kept.

    ``rate_scale=2`` makes arrivals twice as dense (every arrival time is divided by 2). ``target_rps``
    scales so that the mean rate over the trace span, ``(len(records) - 1) / (last - first arrival)``
    (one over the mean gap), equals ``target_rps``; it needs at least two records with distinct arrivals.
    Give at most one of the two; with neither, the result is an unchanged copy. Non-positive or
    non-finite values raise ValueError.
    """
    if rate_scale is not None and target_rps is not None:
        raise ValueError("give rate_scale or target_rps, not both")
    if rate_scale is not None:
        factor = _check_positive("rate_scale", rate_scale)
    elif target_rps is not None:
        target = _check_positive("target_rps", target_rps)
        if len(records) < 2:
            raise ValueError(f"target_rps needs at least 2 records, got {len(records)}")
        arrivals = [record.arrival_s for record in records]
        span = max(arrivals) - min(arrivals)
        if span <= 0:
            raise ValueError("target_rps: all records arrive at the same time, the trace has no rate")
        factor = target / ((len(records) - 1) / span)
    else:
        return list(records)
    return [TraceRecord(r.arrival_s / factor, r.prompt_tokens, r.output_tokens) for r in records]


def window(
    records: Iterable[TraceRecord], *, start_s: float = 0.0, duration_s: float | None = None
) -> list[TraceRecord]:
    """The records with ``start_s <= arrival_s < start_s + duration_s``, re-based to start at 0.

    ``duration_s=None`` keeps everything from ``start_s`` on. Order is kept. An empty window gives ``[]``.
    """
    if not _is_real(start_s):
        raise ValueError(f"start_s must be a finite number, got {start_s!r}")
    end = math.inf if duration_s is None else start_s + _check_positive("duration_s", duration_s)
    kept = [record for record in records if start_s <= record.arrival_s < end]
    if not kept:
        return []
    base = min(record.arrival_s for record in kept)
    return [TraceRecord(r.arrival_s - base, r.prompt_tokens, r.output_tokens) for r in kept]


def sample(
    records: Sequence[TraceRecord],
    *,
    n: int | None = None,
    fraction: float | None = None,
    rng: random.Random,
) -> list[TraceRecord]:
    """A uniform random subset without replacement, in input order with its arrival times (thinning).

    Give exactly one of ``n`` (0 <= n <= len(records)) and ``fraction`` (0 <= fraction <= 1; keeps
    ``round(fraction * len(records))`` records). Thinning a Poisson trace by ``fraction`` gives a Poisson
    trace of ``fraction`` times the rate.
    """
    if (n is None) == (fraction is None):
        raise ValueError("give exactly one of n and fraction")
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= len(records):
            raise ValueError(f"n must be an integer in [0, {len(records)}], got {n!r}")
        k = n
    else:
        assert fraction is not None
        if not _is_real(fraction) or not 0 <= fraction <= 1:
            raise ValueError(f"fraction must be a number in [0, 1], got {fraction!r}")
        k = round(fraction * len(records))
    return [records[i] for i in sorted(rng.sample(range(len(records)), k))]


# --------------------------------------------------------------------------------------------- synthetic

_ARRIVALS = ("poisson", "gamma", "onoff")


def synthetic(
    *,
    rate_rps: float,
    duration_s: float,
    rng: random.Random,
    arrival: str = "poisson",
    cv: float = 1.0,
    lengths: Sequence[TraceRecord] | None = None,
    prompt_mean: float = 1024,
    output_mean: float = 128,
    sigma: float = 1.0,
    on_s: float = 10.0,
    off_s: float = 30.0,
    off_rate_fraction: float = 0.1,
) -> list[TraceRecord]:
    """A synthetic workload over ``[0, duration_s)``: first arrival at 0, then i.i.d. gaps of mean 1/rate.

    ``arrival="poisson"``: exponential gaps (``cv`` must stay 1). ``arrival="gamma"``: gamma gaps with
    coefficient of variation ``cv`` (shape ``1/cv**2``); ``cv=1`` is Poisson, ``cv > 1`` bursty, ``cv < 1``
    more regular. ``arrival="onoff"``: bursts. Poisson arrivals whose rate switches between an on
    phase and an off phase, with exponentially distributed phase lengths of means ``on_s`` and
    ``off_s`` (the run starts in a burst); the off rate is ``off_rate_fraction`` of the on rate, and the
    on rate is set so that the long-run mean stays ``rate_rps``.

    Lengths: with ``lengths``, each record takes the (prompt, output) pair of a record drawn from it with
    replacement, which keeps the real joint distribution; else both are lognormal with log-sigma ``sigma``
    and means ``prompt_mean`` and ``output_mean`` (``mu = log(mean) - sigma**2/2``), rounded, >= 1 token.

    Deterministic for a seeded ``rng``. Bad parameters raise ValueError naming the parameter.
    """
    rate = _check_positive("rate_rps", rate_rps)
    duration = _check_positive("duration_s", duration_s)
    shape = _check_positive("cv", cv) ** -2
    if arrival not in _ARRIVALS:
        raise ValueError(f"arrival must be one of {', '.join(_ARRIVALS)}, got {arrival!r}")
    if arrival != "gamma" and cv != 1.0:
        raise ValueError(f"cv applies to arrival='gamma' only (Poisson gaps have cv 1), got cv={cv!r}")
    on = _check_positive("on_s", on_s)
    off = _check_positive("off_s", off_s)
    if not _is_real(off_rate_fraction) or not 0 <= off_rate_fraction <= 1:
        raise ValueError(f"off_rate_fraction must be within [0, 1], got {off_rate_fraction!r}")
    pool = None if lengths is None else list(lengths)
    if pool is not None and not pool:
        raise ValueError("lengths must not be empty")
    prompt_mu = math.log(_check_positive("prompt_mean", prompt_mean))
    output_mu = math.log(_check_positive("output_mean", output_mean))
    if not _is_real(sigma) or sigma < 0:
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
    prompt_mu -= sigma * sigma / 2
    output_mu -= sigma * sigma / 2

    if arrival == "poisson":

        def gap() -> float:
            return rng.expovariate(rate)
    elif arrival == "gamma":
        scale = 1.0 / (rate * shape)

        def gap() -> float:
            return rng.gammavariate(shape, scale)
    else:
        gap = _on_off_gaps(rng, rate, on, off, off_rate_fraction)

    records: list[TraceRecord] = []
    t = 0.0
    while t < duration:
        if pool is not None:
            picked = rng.choice(pool)
            prompt, output = picked.prompt_tokens, picked.output_tokens
        else:
            prompt = max(1, round(rng.lognormvariate(prompt_mu, sigma)))
            output = max(1, round(rng.lognormvariate(output_mu, sigma)))
        records.append(TraceRecord(t, prompt, output))
        t += gap()
    return records


def _on_off_gaps(
    rng: random.Random, rate: float, on_s: float, off_s: float, off_fraction: float
) -> Callable[[], float]:
    """Gaps of a two-phase Markov-modulated Poisson process whose long-run mean rate is ``rate``."""
    burst = rate * (on_s + off_s) / (on_s + off_fraction * off_s)
    rates = (burst, burst * off_fraction)
    means = (on_s, off_s)
    phase, left = 0, rng.expovariate(1.0 / on_s)

    def gap() -> float:
        nonlocal phase, left
        waited = 0.0
        while True:
            # Memoryless: a draw cut short by the phase's end is redrawn at the next phase's rate.
            step = rng.expovariate(rates[phase]) if rates[phase] > 0 else math.inf
            if step <= left:
                left -= step
                return waited + step
            waited += left
            phase = 1 - phase
            left = rng.expovariate(1.0 / means[phase])

    return gap


# --------------------------------------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True)
class Share:
    """A name with a relative share; shares need not sum to 1 but must be finite and > 0."""

    name: str
    share: float

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("Share.name must be a non-empty string")
        _check_positive(f"share of {self.name!r}", self.share)


@dataclass(slots=True)
class Rejected:
    """A record :func:`assign` could not turn into a valid request."""

    index: int
    """The record's index in the input."""
    error: RequestValidationError


def _cumulative(what: str, shares: Sequence[float]) -> list[float]:
    if not shares:
        raise ValueError(f"{what} must not be empty")
    total = 0.0
    cumulative = []
    for share in shares:
        total += _check_positive(f"{what} share", share)
        cumulative.append(total)
    return cumulative


def assign(
    records: Sequence[TraceRecord],
    *,
    models: Sequence[Share],
    classes: Sequence[tuple[SLOClass, float]],
    rng: random.Random,
    model_specs: Mapping[str, ModelSpec] | None = None,
    max_tokens: int = 2048,
    tenants: Sequence[Share] = (),
    id_prefix: str = "r",
) -> tuple[list[Request], list[Rejected]]:
    """Turn records into validated requests, each with a model, SLO class and tenant drawn by share.

    Request ``i`` gets id ``f"{id_prefix}{i}"``, the record's arrival, prompt and true output length, and
    the class's SLO budgets, priority and weight. Its ``max_tokens`` is the client's ``max_tokens`` but
    never below the true output length and, where ``model_specs`` knows the model's context window,
    clipped to fit it: ``max(output, min(max_tokens, context_len - prompt))``. Records that fail
    validation (a prompt that does not fit the context, a true output that does not fit beside it) go to
    the rejected list with the :class:`RequestValidationError` naming the field; none is dropped silently.

    Each record consumes exactly three ``rng.random()`` draws (model, class, tenant, in that order, drawn
    even where there is a single choice), so the result is deterministic for a seeded ``rng`` and changing
    one dimension's shares never reshuffles the others. Without ``tenants`` every request is tenant
    ``"default"``. Configuration errors (empty or non-positive shares, a model missing from
    ``model_specs``) raise ValueError.
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    model_names = [share.name for share in models]
    model_cum = _cumulative("models", [share.share for share in models])
    class_list = [cls for cls, _ in classes]
    class_cum = _cumulative("classes", [share for _, share in classes])
    tenant_names = [share.name for share in tenants] or ["default"]
    tenant_cum = _cumulative("tenants", [share.share for share in tenants] or [1.0])
    context: list[int | None] = [None] * len(model_names)
    if model_specs is not None:
        unknown = [name for name in model_names if name not in model_specs]
        if unknown:
            served = ", ".join(sorted(model_specs)) or "none"
            raise ValueError(f"models not in model_specs: {', '.join(unknown)} (specs for: {served})")
        context = [model_specs[name].context_len for name in model_names]

    # bisect's hi= caps the index at the last choice, should rounding ever put a draw at the total.
    m_total, m_last = model_cum[-1], len(model_cum) - 1
    c_total, c_last = class_cum[-1], len(class_cum) - 1
    t_total, t_last = tenant_cum[-1], len(tenant_cum) - 1
    draw, make = rng.random, make_request
    requests: list[Request] = []
    rejected: list[Rejected] = []
    for i, record in enumerate(records):
        m = bisect_right(model_cum, draw() * m_total, 0, m_last)
        c = bisect_right(class_cum, draw() * c_total, 0, c_last)
        t = bisect_right(tenant_cum, draw() * t_total, 0, t_last)
        prompt, output = record.prompt_tokens, record.output_tokens
        context_len = context[m]
        room = max_tokens if context_len is None else min(max_tokens, context_len - prompt)
        try:
            request = make(
                f"{id_prefix}{i}",
                model_names[m],
                prompt,
                output if output > room else room,
                record.arrival_s,
                slo_class=class_list[c],
                tenant=tenant_names[t],
                true_output_tokens=output,
                models=model_specs,
            )
        except RequestValidationError as error:
            rejected.append(Rejected(i, error.with_traceback(None)))  # no frames kept alive
        else:
            requests.append(request)
    return requests, rejected
