"""Request trace files: the schemas read, and the trace samples shipped with the package.

:func:`load_trace` reads any of :data:`SCHEMAS`, found from the file itself: the Azure LLM inference
traces (2023 and 2024; Splitwise's), BurstGPT's CSV and Mooncake's JSON Lines. Each becomes a list of
:class:`TraceRecord` (arrival, prompt length, true output length) sorted by arrival, relative to the
first. A file that is none of them, or has a bad row, raises :class:`TraceError` naming the file, the
line and the column.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import pathlib
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.resources import files
from typing import NoReturn

__all__ = [
    "AZURE",
    "BURSTGPT",
    "MOONCAKE",
    "PACKAGED_TRACES",
    "SCHEMAS",
    "TraceError",
    "TraceRecord",
    "TraceSchema",
    "load_azure_trace",
    "load_trace",
    "packaged_trace_path",
]

log = logging.getLogger(__name__)
#: The skipped-rows warnings given in this process: a trace read again (plan-capacity reads it
#: once to check it and once per GPU kind) says it once.
_WARNED: set[tuple[str, int]] = set()


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


@dataclass(frozen=True, slots=True)
class TraceSchema:
    """Where a trace file keeps the three fields a workload needs."""

    name: str
    time: str
    """The arrival: a date-time, or a number of ``seconds_per_unit`` since some origin."""
    prompt: str
    output: str
    seconds_per_unit: float
    jsonl: bool
    """A JSON Lines file (one object per line) rather than a CSV with a header."""

    @property
    def fields(self) -> tuple[str, str, str]:
        return (self.time, self.prompt, self.output)

    def describe(self) -> str:
        unit = "" if self.seconds_per_unit == 1.0 else f" ({self.seconds_per_unit * 1000:g} ms units)"
        kind = "JSON Lines with the keys" if self.jsonl else "a CSV with the columns"
        return f"{self.name}: {kind} {self.time}{unit}, {self.prompt}, {self.output}"


AZURE = TraceSchema("Azure LLM inference trace", "TIMESTAMP", "ContextTokens", "GeneratedTokens", 1.0, False)
BURSTGPT = TraceSchema("BurstGPT", "Timestamp", "Request tokens", "Response tokens", 1.0, False)
MOONCAKE = TraceSchema("Mooncake", "timestamp", "input_length", "output_length", 0.001, True)
#: Every schema :func:`load_trace` reads. A row with no output tokens is a request that generated
#: nothing (BurstGPT records its failures so): it is skipped, and the count is logged.
SCHEMAS: tuple[TraceSchema, ...] = (AZURE, BURSTGPT, MOONCAKE)


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


def load_trace(path: str | os.PathLike[str]) -> list[TraceRecord]:
    """Read a trace file in any of :data:`SCHEMAS`, sorted by arrival, relative to the first.

    A file whose first character is ``{`` is JSON Lines (Mooncake's: ``timestamp`` in milliseconds,
    ``input_length``, ``output_length``; other keys ignored); any other is a CSV whose header names the
    schema (Azure's ``TIMESTAMP,ContextTokens,GeneratedTokens`` or BurstGPT's ``Timestamp,Request
    tokens,Response tokens``; other columns ignored, column order free). CSV timestamps are date-times
    or seconds, as :func:`load_azure_trace` says. Token counts are integers; a prompt has at least one
    token; a row with no output tokens is skipped (a request that generated nothing), and how many were
    is logged.

    Raises :class:`TraceError` naming the file (and the line and column, for a bad cell) when the file
    is missing or unreadable, is none of the schemas, has a malformed row, or has no data rows.
    """
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8-sig", newline="") as handle:
            first = handle.read(64).lstrip()
    except UnicodeDecodeError as exc:
        raise TraceError(name, f"not UTF-8 text: {exc}") from exc
    except OSError as exc:
        raise TraceError(name, f"cannot read the trace: {exc.strerror or exc}") from exc
    if first.startswith("{"):
        return _load_jsonl(name, MOONCAKE)
    return _load_csv(name, tuple(s for s in SCHEMAS if not s.jsonl))


def load_azure_trace(path: str | os.PathLike[str]) -> list[TraceRecord]:
    """Read a trace in the Azure LLM inference trace 2023 schema, sorted by arrival, relative to the first.

    The file is a CSV with the header ``TIMESTAMP,ContextTokens,GeneratedTokens`` (other columns are
    allowed and ignored, column order is free). ``TIMESTAMP`` is either an ISO date-time such as
    ``2023-11-16 18:15:46.6805900`` (any number of fractional digits; naive times are UTC) or a number of
    seconds; the kind is fixed by the first data row. Blank lines are skipped. Prompts have at least one
    token; a row with no output tokens is skipped and counted in the log (the Azure 2023 traces have
    none: the smallest output is 6 tokens).

    Raises :class:`TraceError` naming the file (and the 1-based line and the column, for a bad cell) when
    the file is missing or unreadable, a required column is missing, a cell is malformed or out of range,
    or the trace has no data rows.
    """
    return _load_csv(os.fspath(path), (AZURE,))


class _Rows:
    """The parsed rows of a trace, kept as columns (whole seconds and their fraction apart, so a
    date-time keeps its 100 ns resolution)."""

    def __init__(self, name: str, schema: TraceSchema) -> None:
        self.name = name
        self.schema = schema
        self.whole: list[int] = []
        self.frac: list[float] = []
        self.prompts: list[int] = []
        self.outputs: list[int] = []
        self.no_output = 0

    def add(self, seconds: int, fraction: float, prompt: int, output: int) -> None:
        if output == 0:
            self.no_output += 1
            return
        self.whole.append(seconds)
        self.frac.append(fraction)
        self.prompts.append(prompt)
        self.outputs.append(output)

    def records(self) -> list[TraceRecord]:
        if self.no_output and (self.name, self.no_output) not in _WARNED:
            _WARNED.add((self.name, self.no_output))
            log.warning(
                "%s: skipped %d requests with no output tokens (%s 0)",
                self.name,
                self.no_output,
                self.schema.output,
            )
        if not self.whole:
            what = "no data rows" if not self.no_output else "no requests with output tokens"
            raise TraceError(self.name, what + (" after the header" if not self.schema.jsonl else ""))
        # Relative to the file's first row first (small numbers, so float keeps sub-microsecond
        # precision), then to the earliest arrival.
        w0, f0 = self.whole[0], self.frac[0]
        relative = [(w - w0) + (f - f0) for w, f in zip(self.whole, self.frac, strict=True)]
        order = sorted(range(len(relative)), key=relative.__getitem__)  # stable: ties keep file order
        first = relative[order[0]]
        return [TraceRecord(relative[i] - first, self.prompts[i], self.outputs[i]) for i in order]


def _pick_schema(name: str, columns: list[str], schemas: tuple[TraceSchema, ...]) -> TraceSchema:
    """The schema whose columns the header has; else the error naming what is missing."""
    for schema in schemas:
        if all(field in columns for field in schema.fields):
            return schema
    closest = max(schemas, key=lambda s: sum(field in columns for field in s.fields))
    missing = [field for field in closest.fields if field not in columns]
    if len(missing) < 3:
        expected = ",".join(closest.fields)
        raise TraceError(
            name,
            f"missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
            f"(header: {','.join(columns)!r}; expected {expected})",
            line=1,
        )
    known = "; ".join(s.describe() for s in (SCHEMAS if len(schemas) > 1 else schemas))
    raise TraceError(
        name, f"not a trace file of a known schema (header: {','.join(columns)!r}; expected {known})", line=1
    )


def _load_csv(name: str, schemas: tuple[TraceSchema, ...]) -> list[TraceRecord]:
    reader = None
    try:
        with open(name, encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                expected = " or ".join(",".join(s.fields) for s in schemas)
                raise TraceError(name, f"empty file: expected the header {expected}", line=1)
            columns = [cell.strip() for cell in header]
            schema = _pick_schema(name, columns, schemas)
            rows = _Rows(name, schema)
            whole, frac, prompts, outputs = rows.whole, rows.frac, rows.prompts, rows.outputs
            indices = tuple(columns.index(field) for field in schema.fields)
            i_time, i_prompt, i_output = indices
            width = max(indices) + 1
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
                    good = prompt >= 1 and output >= 0
                except (ValueError, IndexError, OverflowError, OSError):
                    good = False
                if not good:
                    if _is_blank(row):
                        continue
                    _diagnose(rows, reader.line_num, row, len(columns), indices, parse_time)
                if output:  # (rows.add inlined: this loop reads millions of rows)
                    whole.append(seconds)
                    frac.append(fraction)
                    prompts.append(prompt)
                    outputs.append(output)
                else:
                    rows.no_output += 1
    except TraceError:
        raise
    except csv.Error as exc:
        at = None if reader is None else reader.line_num
        raise TraceError(name, f"malformed CSV: {exc}", line=at) from exc
    except UnicodeDecodeError as exc:
        raise TraceError(name, f"not UTF-8 text: {exc}") from exc
    except OSError as exc:
        raise TraceError(name, f"cannot read the trace: {exc.strerror or exc}") from exc
    return rows.records()


def _is_blank(row: list[str]) -> bool:
    return not row or (len(row) == 1 and not row[0].strip())


def _diagnose(
    rows: _Rows,
    line: int,
    row: list[str],
    n_columns: int,
    indices: tuple[int, ...],
    parse_time: Callable[[str], tuple[int, float]],
) -> NoReturn:
    """Raise the :class:`TraceError` for the first bad cell of a row the fast path could not take."""
    name, schema = rows.name, rows.schema
    i_time, i_prompt, i_output = indices
    if len(row) <= max(indices):
        raise TraceError(name, f"expected {n_columns} columns, got {len(row)}: {row!r}", line=line)
    cell = row[i_time]
    try:
        parse_time(cell)
    except (ValueError, OverflowError, OSError):
        kind = "number of seconds" if parse_time is _parse_seconds else "date-time"
        message = f"not a {kind} (as on the first data row): {cell!r}"
        raise TraceError(name, message, line=line, column=schema.time) from None
    for column, index in ((schema.prompt, i_prompt), (schema.output, i_output)):
        try:
            value = int(row[index])
        except ValueError:
            raise TraceError(name, f"not an integer: {row[index]!r}", line=line, column=column) from None
        _check_count(name, line, column, value, least=1 if column == schema.prompt else 0)
    raise TraceError(name, f"cannot read the row {row!r}", line=line)  # unreachable in practice


def _check_count(name: str, line: int, column: str, value: int, least: int) -> None:
    if value < 0:
        raise TraceError(name, f"negative token count: {value}", line=line, column=column)
    if value < least:
        raise TraceError(name, f"must be >= {least} token, got {value}", line=line, column=column)


def _load_jsonl(name: str, schema: TraceSchema) -> list[TraceRecord]:
    rows = _Rows(name, schema)
    try:
        with open(name, encoding="utf-8-sig") as handle:
            for line, record in _objects(name, handle):
                missing = [key for key in schema.fields if key not in record]
                if missing:
                    raise TraceError(
                        name, f"missing key{'s' if len(missing) > 1 else ''} {', '.join(missing)}", line=line
                    )
                moment = record[schema.time]
                if (
                    not isinstance(moment, (int, float))
                    or isinstance(moment, bool)
                    or not 0 <= moment < math.inf
                ):
                    raise TraceError(name, f"not a number >= 0: {moment!r}", line=line, column=schema.time)
                counts = []
                for key, least in ((schema.prompt, 1), (schema.output, 0)):
                    value = record[key]
                    if not isinstance(value, int) or isinstance(value, bool):
                        raise TraceError(name, f"not an integer: {value!r}", line=line, column=key)
                    _check_count(name, line, key, value, least)
                    counts.append(value)
                seconds = moment * schema.seconds_per_unit
                whole = math.floor(seconds)
                rows.add(whole, seconds - whole, counts[0], counts[1])
    except UnicodeDecodeError as exc:
        raise TraceError(name, f"not UTF-8 text: {exc}") from exc
    except OSError as exc:
        raise TraceError(name, f"cannot read the trace: {exc.strerror or exc}") from exc
    return rows.records()


def _objects(name: str, handle: Iterator[str]) -> Iterator[tuple[int, dict[str, object]]]:
    """The non-blank lines of a JSON Lines file, each a JSON object, with their 1-based numbers."""
    for line, text in enumerate(handle, start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TraceError(name, f"not JSON: {exc.msg} at column {exc.colno}", line=line) from None
        if not isinstance(record, dict):
            raise TraceError(name, f"not a JSON object: {text.strip()[:60]!r}", line=line)
        yield line, record


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
