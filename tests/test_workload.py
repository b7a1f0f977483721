"""Workloads: the Azure trace loader, packaged samples, reshaping, synthetic arrivals, and assign()."""

from __future__ import annotations

import random
import statistics
from collections import Counter
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path

import pytest

from qlm_plugin.domain.request import DEFAULT_CLASSES, ModelSpec, SLOClass
from qlm_plugin.workloads.records import Rejected, Share, assign, sample, scale_arrivals, synthetic, window
from qlm_plugin.workloads.trace_files import (
    TraceError,
    TraceRecord,
    load_azure_trace,
    load_trace,
    packaged_trace_path,
)

SHARED_TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"
CONV = SHARED_TRACES / "azure_llm_2023_conv.csv"
CODE = SHARED_TRACES / "azure_llm_2023_code.csv"
needs_conv = pytest.mark.skipif(
    not CONV.is_file(), reason=f"full Azure conversation trace not found at {CONV}"
)
needs_code = pytest.mark.skipif(not CODE.is_file(), reason=f"full Azure code trace not found at {CODE}")

HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
INTERACTIVE = DEFAULT_CLASSES["interactive"]
BATCH = DEFAULT_CLASSES["batch"]


def write(tmp_path: Path, text: str, name: str = "trace.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def gaps_cv(records: Sequence[TraceRecord]) -> float:
    gaps = [b.arrival_s - a.arrival_s for a, b in pairwise(records)]
    return statistics.pstdev(gaps) / statistics.fmean(gaps)


def mean_rate(records: Sequence[TraceRecord]) -> float:
    return (len(records) - 1) / (records[-1].arrival_s - records[0].arrival_s)


# ---------------------------------------------------------------------------------------------- real traces


@needs_conv
def test_full_conversation_trace_loads_as_documented() -> None:
    records = load_azure_trace(CONV)
    assert len(records) == 19_366  # data rows; the file has a header and no trailing newline
    arrivals = [r.arrival_s for r in records]
    assert arrivals[0] == 0.0
    assert all(a <= b for a, b in pairwise(arrivals))
    # 18:15:46.6805900 to 19:14:08.4025270, to the 100 ns of the file
    assert arrivals[-1] == pytest.approx(3501.721937, abs=1e-6)
    assert arrivals[1] == pytest.approx(50.9951690 - 46.6805900, abs=1e-9)
    assert statistics.median(r.prompt_tokens for r in records) == 1020
    assert statistics.median(r.output_tokens for r in records) == 129
    assert max(r.output_tokens for r in records) == 1000
    assert min(min(r.prompt_tokens, r.output_tokens) for r in records) >= 1


@needs_code
def test_full_code_trace_loads_as_documented() -> None:
    records = load_azure_trace(str(CODE))
    assert len(records) == 8_819
    assert records[0].arrival_s == 0.0
    assert statistics.median(r.prompt_tokens for r in records) == 1469
    assert statistics.median(r.output_tokens for r in records) == 13
    assert max(r.output_tokens for r in records) == 1899


# ----------------------------------------------------------------------------------------- packaged samples


@pytest.mark.parametrize(
    ("name", "rows", "span_s"), [("conv", 2421, 3496.730227), ("code", 1260, 3434.747322)]
)
def test_packaged_samples_load(name: str, rows: int, span_s: float) -> None:
    path = packaged_trace_path(name)
    assert path.is_file()
    records = load_azure_trace(path)
    assert len(records) == rows
    assert records[0].arrival_s == 0.0
    assert records[-1].arrival_s == pytest.approx(span_s, abs=1e-6)


@needs_conv
@needs_code
@pytest.mark.parametrize(("name", "full"), [("conv", CONV), ("code", CODE)])
def test_packaged_samples_are_verbatim_evenly_thinned_full_traces(name: str, full: Path) -> None:
    step = {"conv": 8, "code": 7}[name]
    full_lines = full.read_bytes().splitlines()
    sample_lines = packaged_trace_path(name).read_bytes().splitlines()
    assert sample_lines[0] == full_lines[0]
    assert sample_lines[1:] == full_lines[1::step]


def test_packaged_samples_carry_their_attribution() -> None:
    text = (packaged_trace_path("conv").parent / "TRACES.md").read_text(encoding="utf-8")
    for needle in ("CC-BY 4.0", "Splitwise", "Azure LLM inference trace 2023", "every 8th", "every 7th"):
        assert needle in text


def test_unknown_packaged_trace_lists_the_known_names() -> None:
    with pytest.raises(ValueError, match=r"'chat'.*'code', 'conv'"):
        packaged_trace_path("chat")


# -------------------------------------------------------------------------------------------------- parsing


def test_seven_digit_timestamps_keep_their_precision(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        HEADER + "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:47.0000001,396,109\n"
        "2023-11-16 23:59:59.9000000,10,1\n"
        "2023-11-17 00:00:00.1000000,20,2\n",
    )
    arrivals = [r.arrival_s for r in load_azure_trace(path)]
    assert arrivals[1] == pytest.approx(0.3194101, abs=1e-9)
    assert arrivals[3] - arrivals[2] == pytest.approx(0.2, abs=1e-9)  # across midnight
    assert arrivals[3] == pytest.approx(5 * 3600 + 44 * 60 + 13.4194100, abs=1e-6)


def test_a_trace_read_again_in_the_same_process_gives_the_same_arrival_times(tmp_path: Path) -> None:
    """The parser caches each minute's epoch second; a time read with its minute cached must be the
    same float as one read without (they were up to 1e-14 s apart, and an overloaded simulation run after
    another in one process, as ``qlm bench`` runs them, moved by 10 points)."""
    from qlm_plugin.workloads import trace_files as records

    # the conversation trace's first request and the first of its next minute
    path = write(
        tmp_path, HEADER + "2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:16:00.7401400,181,154\n"
    )
    records._EPOCH_MINUTES.clear()
    first = [r.arrival_s for r in load_azure_trace(path)]  # each minute's first time parsed in full
    again = [r.arrival_s for r in load_azure_trace(path)]  # every minute cached
    assert first == again  # exactly: the simulation's event order depends on the last bit


def test_other_iso_forms_agree(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        HEADER + "2023-11-16 18:00:00,1,1\n"
        "2023-11-16T18:00:01.5Z,1,1\n"
        "2023-11-16T20:00:02.25+02:00,1,1\n"
        "2023-11-16 18:00:03.123456789,1,1\n",
    )
    arrivals = [r.arrival_s for r in load_azure_trace(path)]
    assert arrivals == pytest.approx([0.0, 1.5, 2.25, 3.123456789], abs=1e-9)


def test_numeric_timestamps_are_seconds(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER + "100.5,10,2\n101,20,3\n103.25,30,4\n")
    assert load_azure_trace(path) == [
        TraceRecord(0.0, 10, 2),
        TraceRecord(0.5, 20, 3),
        TraceRecord(2.75, 30, 4),
    ]


def test_out_of_order_rows_are_sorted_relative_to_the_earliest(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER + "5,1,1\n2,2,2\n9,3,3\n2,4,4\n")
    records = load_azure_trace(path)
    assert [r.arrival_s for r in records] == [0.0, 0.0, 3.0, 7.0]
    assert [r.prompt_tokens for r in records] == [2, 4, 1, 3]  # ties keep file order


def test_crlf_bom_blank_lines_extra_and_reordered_columns(tmp_path: Path) -> None:
    path = tmp_path / "trace.csv"
    path.write_bytes(
        b"\xef\xbb\xbfGeneratedTokens,Extra,TIMESTAMP,ContextTokens\r\n"
        b"7,x,2023-11-16 18:15:46.6805900,100\r\n\r\n"
        b"8,y,2023-11-16 18:15:48.6805900,200\r\n\r\n"
    )
    assert load_azure_trace(path) == [TraceRecord(0.0, 100, 7), TraceRecord(2.0, 200, 8)]


# -------------------------------------------------------------------------------------------- loader errors


def load_error(path: Path) -> TraceError:
    with pytest.raises(TraceError) as info:
        load_azure_trace(path)
    assert isinstance(info.value, ValueError)
    return info.value


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    error = load_error(tmp_path / "nope.csv")
    assert str(tmp_path / "nope.csv") in str(error)


def test_a_directory_is_not_a_trace(tmp_path: Path) -> None:
    assert str(tmp_path) in str(load_error(tmp_path))


def test_empty_file_and_header_only_are_errors(tmp_path: Path) -> None:
    assert "empty file" in str(load_error(write(tmp_path, "", "empty.csv")))
    assert "no data rows" in str(load_error(write(tmp_path, HEADER + "\n\n", "header.csv")))


def test_missing_header_column_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "TIMESTAMP,ContextTokens,OutputTokens\n2023-11-16 18:15:46,1,1\n")
    error = load_error(path)
    assert str(error).startswith(f"{path}:1: missing column GeneratedTokens")


def test_not_a_csv_header_at_all(tmp_path: Path) -> None:
    error = load_error(write(tmp_path, "hello world\n1,2,3\n"))
    assert "TIMESTAMP, ContextTokens, GeneratedTokens" in str(error)


@pytest.mark.parametrize(
    ("row", "column", "reason"),
    [
        ("2023-11-16 18:15:47.1,x,5", "ContextTokens", "not an integer: 'x'"),
        ("2023-11-16 18:15:47.1,12.5,5", "ContextTokens", "not an integer: '12.5'"),
        ("2023-11-16 18:15:47.1,0,5", "ContextTokens", "must be >= 1 token, got 0"),
        ("2023-11-16 18:15:47.1,10,-3", "GeneratedTokens", "negative token count: -3"),
        ("2023-11-16 18:15:47.1,10,", "GeneratedTokens", "not an integer: ''"),
        ("2023-11-16 25:15:47.1,10,5", "TIMESTAMP", "not a date-time"),
        ("2023-02-30 18:15:47.1,10,5", "TIMESTAMP", "not a date-time"),
        ("yesterday,10,5", "TIMESTAMP", "not a date-time"),
        ("1700000000.5,10,5", "TIMESTAMP", "not a date-time"),  # the kind is fixed by the first row
    ],
)
def test_bad_cell_names_file_line_and_column(tmp_path: Path, row: str, column: str, reason: str) -> None:
    # line 1 header, line 2 good, line 3 blank, line 4 the bad row
    path = write(tmp_path, HEADER + "2023-11-16 18:15:46.6805900,374,44\n\n" + row + "\n")
    error = load_error(path)
    assert str(error).startswith(f"{path}:4: {column}: {reason}")
    assert (error.line, error.column) == (4, column)


def test_the_documented_message_form(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER + "1,1,1\n" * 15 + "2,x,1\n")
    assert str(load_error(path)) == f"{path}:17: ContextTokens: not an integer: 'x'"


def test_short_row_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER + "1,2,3\n4,5\n")
    assert str(load_error(path)).startswith(f"{path}:3: expected 3 columns, got 2")


def test_bad_numeric_timestamp(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER + "1.5,2,3\nnan,5,6\n")
    assert str(load_error(path)).startswith(f"{path}:3: TIMESTAMP: not a number of seconds")


def test_rows_without_output_are_skipped_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A request that generated nothing (a failure the service recorded) is not a workload request."""
    path = write(tmp_path, HEADER + "1,10,5\n2,20,0\n3,30,7\n")
    assert load_azure_trace(path) == [TraceRecord(0.0, 10, 5), TraceRecord(2.0, 30, 7)]
    assert "skipped 1 requests with no output tokens (GeneratedTokens 0)" in caplog.text
    caplog.clear()
    load_azure_trace(path)  # read again (plan-capacity: once per GPU kind): said once
    assert "skipped" not in caplog.text
    only_failures = write(tmp_path, HEADER + "1,10,0\n", "failed.csv")
    assert "no requests with output tokens" in str(load_error(only_failures))


def test_burstgpt_csv_is_read_and_its_failed_requests_skipped(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "5,ChatGPT,472,18,490,Conversation log\n"
        "3.5,GPT-4,1020,0,1020,Conversation log\n"  # a failure: no response
        "6.25,GPT-4,30,200,230,API log\n",
        "burst.csv",
    )
    assert load_trace(path) == [TraceRecord(0.0, 472, 18), TraceRecord(1.25, 30, 200)]


def test_mooncake_jsonl_is_read_in_milliseconds(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '{"timestamp": 3052, "input_length": 7234, "output_length": 794, "hash_ids": [0, 28]}\n\n'
        '{"timestamp": 0, "input_length": 6755, "output_length": 500, "hash_ids": [0, 1, 2]}\n'
        '{"timestamp": 0, "input_length": 7319, "output_length": 490, "hash_ids": [0, 14]}\n',
        "mooncake.jsonl",
    )
    assert load_trace(path) == [
        TraceRecord(0.0, 6755, 500),
        TraceRecord(0.0, 7319, 490),
        TraceRecord(3.052, 7234, 794),
    ]


def test_load_trace_reads_the_azure_schema_as_load_azure_trace_does(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER + "2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:48.1,10,5\n")
    assert load_trace(path) == load_azure_trace(path)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"timestamp": 1, "input_length": 5', "not JSON"),
        ("[1, 2, 3]", "not a JSON object"),
        ('{"timestamp": 1, "input_length": 5}', "missing key output_length"),
        (
            '{"timestamp": "soon", "input_length": 5, "output_length": 1}',
            "timestamp: not a number >= 0: 'soon'",
        ),
        ('{"timestamp": -1, "input_length": 5, "output_length": 1}', "timestamp: not a number >= 0: -1"),
        ('{"timestamp": 1, "input_length": 5.5, "output_length": 1}', "input_length: not an integer: 5.5"),
        (
            '{"timestamp": 1, "input_length": 0, "output_length": 1}',
            "input_length: must be >= 1 token, got 0",
        ),
        ('{"timestamp": 1, "input_length": 5, "output_length": true}', "output_length: not an integer: True"),
        (
            '{"timestamp": 1, "input_length": 5, "output_length": -2}',
            "output_length: negative token count: -2",
        ),
    ],
)
def test_a_bad_jsonl_line_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = write(
        tmp_path, '{"timestamp": 0, "input_length": 5, "output_length": 1}\n' + line + "\n", "t.jsonl"
    )
    with pytest.raises(TraceError) as info:
        load_trace(path)
    assert str(info.value).startswith(f"{path}:2: {message}")


def test_a_file_of_no_known_schema_lists_the_schemas(tmp_path: Path) -> None:
    with pytest.raises(TraceError) as info:
        load_trace(write(tmp_path, "time,prompt,output\n1,2,3\n"))
    message = str(info.value)
    for needle in ("TIMESTAMP, ContextTokens, GeneratedTokens", "Request tokens", "input_length"):
        assert needle in message
    with pytest.raises(TraceError, match="missing column Response tokens"):
        load_trace(write(tmp_path, "Timestamp,Request tokens\n1,2\n", "half.csv"))


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "trace.csv"
    path.write_bytes(HEADER.encode() + b"1,2,3\n\xff\xfe,1,1\n")
    error = load_error(path)
    assert str(error).startswith(f"{path}: not UTF-8")


# ------------------------------------------------------------------------------------------------ reshaping


def uniform(n: int, gap: float = 0.5) -> list[TraceRecord]:
    return [TraceRecord(i * gap, 100 + i, 10 + i) for i in range(n)]


def test_rate_scale_doubles_the_rate_and_keeps_lengths() -> None:
    records = load_azure_trace(packaged_trace_path("conv"))
    faster = scale_arrivals(records, rate_scale=2)
    assert mean_rate(faster) == pytest.approx(2 * mean_rate(records), rel=1e-9)
    assert [r.arrival_s for r in faster] == [r.arrival_s / 2 for r in records]
    assert [(r.prompt_tokens, r.output_tokens) for r in faster] == [
        (r.prompt_tokens, r.output_tokens) for r in records
    ]
    slower = scale_arrivals(records, rate_scale=0.5)
    assert slower[-1].arrival_s == pytest.approx(2 * records[-1].arrival_s)


@pytest.mark.parametrize("target", [0.5, 4.0, 37.0])
def test_target_rps_hits_the_rate(target: float) -> None:
    records = load_azure_trace(packaged_trace_path("code"))
    scaled = scale_arrivals(records, target_rps=target)
    assert len(scaled) == len(records)
    assert mean_rate(scaled) == pytest.approx(target, rel=0.01)
    assert len(scaled) / scaled[-1].arrival_s == pytest.approx(target, rel=0.01)


def test_scale_arrivals_errors_and_identity() -> None:
    records = uniform(10)
    copy = scale_arrivals(records)
    assert copy == records and copy is not records
    for kwargs in (
        {"rate_scale": 0.0},
        {"rate_scale": -2.0},
        {"target_rps": float("nan")},
        {"target_rps": 0},
    ):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            scale_arrivals(records, **kwargs)
    with pytest.raises(ValueError, match="not both"):
        scale_arrivals(records, rate_scale=2, target_rps=3)
    with pytest.raises(ValueError, match="at least 2"):
        scale_arrivals(records[:1], target_rps=3)
    with pytest.raises(ValueError, match="same time"):
        scale_arrivals([TraceRecord(1.0, 1, 1)] * 3, target_rps=3)


def test_window_keeps_the_half_open_interval_and_rebases() -> None:
    records = uniform(100)  # arrivals 0, 0.5, ..., 49.5
    kept = window(records, start_s=10.0, duration_s=5.0)
    assert [r.prompt_tokens for r in kept] == [100 + i for i in range(20, 30)]  # 10.0 <= t < 15.0
    assert kept[0].arrival_s == 0.0
    assert kept[-1].arrival_s == pytest.approx(4.5)
    assert len(window(records, start_s=40.0)) == 20
    assert window(records, start_s=10.2, duration_s=1.0)[0].arrival_s == 0.0  # first kept is 10.5
    assert window(records, start_s=100.0) == []
    with pytest.raises(ValueError, match="duration_s"):
        window(records, duration_s=0)
    with pytest.raises(ValueError, match="start_s"):
        window(records, start_s=float("inf"))


def test_sample_thins_in_order_and_is_deterministic() -> None:
    records = uniform(1000)
    picked = sample(records, n=100, rng=random.Random(7))
    assert len(picked) == 100
    assert len(set(picked)) == 100
    assert [r.arrival_s for r in picked] == sorted(r.arrival_s for r in picked)
    assert set(picked) <= set(records)
    assert sample(records, n=100, rng=random.Random(7)) == picked
    assert sample(records, n=100, rng=random.Random(8)) != picked
    assert len(sample(records, fraction=0.25, rng=random.Random(1))) == 250
    assert sample(records, fraction=1.0, rng=random.Random(1)) == records
    assert sample(records, n=0, rng=random.Random(1)) == []


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"n": 1, "fraction": 0.5}, {"n": 1001}, {"n": -1}, {"fraction": 1.5}, {"fraction": float("nan")}],
)
def test_sample_rejects_bad_arguments(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        sample(uniform(1000), rng=random.Random(0), **kwargs)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ synthetic


def test_poisson_arrivals_have_the_rate_and_cv_one() -> None:
    records = synthetic(rate_rps=50, duration_s=400, rng=random.Random(1))
    arrivals = [r.arrival_s for r in records]
    assert arrivals[0] == 0.0
    assert all(0 <= a < 400 for a in arrivals)
    assert all(a <= b for a, b in pairwise(arrivals))
    assert abs(len(records) - 20_000) < 4 * 20_000**0.5  # Poisson count, 4 sigma
    assert gaps_cv(records) == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("cv", [0.5, 1.0, 3.0])
def test_gamma_arrivals_have_the_requested_cv(cv: float) -> None:
    records = synthetic(rate_rps=100, duration_s=300, rng=random.Random(11), arrival="gamma", cv=cv)
    mean_gap = records[-1].arrival_s / (len(records) - 1)
    assert mean_gap == pytest.approx(0.01, rel=0.05)
    # cv=3 means shape 1/9: the variance estimate is noisy (kurtosis 57), so 10 % is about 4 sigma on 30k gaps
    assert gaps_cv(records) == pytest.approx(cv, rel=0.10)


def test_bursty_arrivals_are_burstier_than_poisson() -> None:
    poisson = synthetic(rate_rps=20, duration_s=500, rng=random.Random(3))
    bursty = synthetic(rate_rps=20, duration_s=500, rng=random.Random(3), arrival="gamma", cv=3)
    assert gaps_cv(bursty) > 2 * gaps_cv(poisson)


def _per_window(records: list[TraceRecord], width_s: float, duration_s: float) -> list[int]:
    counts = [0] * int(duration_s / width_s)
    for r in records:
        counts[int(r.arrival_s / width_s)] += 1
    return counts


def test_on_off_arrivals_keep_the_mean_rate_and_come_in_bursts() -> None:
    records = synthetic(
        rate_rps=20, duration_s=4000, rng=random.Random(2), arrival="onoff", on_s=10, off_s=30
    )
    assert len(records) / 4000 == pytest.approx(20, rel=0.1)
    assert records[0].arrival_s == 0.0
    assert all(a.arrival_s <= b.arrival_s for a, b in pairwise(records))
    # 5-second windows: Poisson counts have a dispersion (variance / mean) of 1; bursts make it far larger
    counts = _per_window(records, 5, 4000)
    assert statistics.pvariance(counts) / statistics.fmean(counts) > 10
    # Bursts run at (10 + 30) / (10 + 0.1 * 30) ~ 3.1x the mean rate, the quiet spells at a tenth of that.
    busy = sorted(counts)
    assert statistics.fmean(busy[-len(busy) // 8 :]) > 2.5 * 100
    assert statistics.fmean(busy[: len(busy) // 2]) < 0.5 * 100


def test_on_off_with_silent_quiet_spells() -> None:
    records = synthetic(
        rate_rps=10,
        duration_s=2000,
        rng=random.Random(4),
        arrival="onoff",
        on_s=5,
        off_s=5,
        off_rate_fraction=0,
    )
    assert len(records) / 2000 == pytest.approx(10, rel=0.15)
    counts = _per_window(records, 1, 2000)
    assert counts.count(0) > 0.3 * len(counts)  # about half the time is silent


def test_synthetic_is_deterministic_per_seed() -> None:
    def make(seed: int) -> list[TraceRecord]:
        return synthetic(rate_rps=5, duration_s=60, rng=random.Random(seed), arrival="gamma", cv=2)

    assert make(42) == make(42)
    assert make(42) != make(43)


def test_synthetic_lognormal_lengths() -> None:
    records = synthetic(rate_rps=100, duration_s=200, rng=random.Random(5), prompt_mean=900, output_mean=150)
    assert min(min(r.prompt_tokens, r.output_tokens) for r in records) >= 1
    assert all(isinstance(r.prompt_tokens, int) and isinstance(r.output_tokens, int) for r in records)
    assert statistics.fmean(r.prompt_tokens for r in records) == pytest.approx(900, rel=0.05)
    assert statistics.fmean(r.output_tokens for r in records) == pytest.approx(150, rel=0.05)
    fixed = synthetic(rate_rps=10, duration_s=10, rng=random.Random(5), sigma=0, prompt_mean=7, output_mean=3)
    assert {(r.prompt_tokens, r.output_tokens) for r in fixed} == {(7, 3)}


def test_synthetic_resamples_real_length_pairs() -> None:
    real = load_azure_trace(packaged_trace_path("code"))
    pairs = {(r.prompt_tokens, r.output_tokens) for r in real}
    records = synthetic(rate_rps=20, duration_s=200, rng=random.Random(9), lengths=real)
    assert {(r.prompt_tokens, r.output_tokens) for r in records} <= pairs
    assert len({(r.prompt_tokens, r.output_tokens) for r in records}) > len(pairs) // 2
    assert statistics.median(r.output_tokens for r in records) == pytest.approx(
        statistics.median(r.output_tokens for r in real), abs=3
    )


@pytest.mark.parametrize(
    ("kwargs", "parameter"),
    [
        ({"rate_rps": 0}, "rate_rps"),
        ({"rate_rps": float("inf")}, "rate_rps"),
        ({"duration_s": -1}, "duration_s"),
        ({"arrival": "weibull"}, "arrival"),
        ({"arrival": "gamma", "cv": 0}, "cv"),
        ({"cv": 2.0}, "cv"),  # cv with Poisson arrivals would be silently ignored
        ({"lengths": []}, "lengths"),
        ({"prompt_mean": 0}, "prompt_mean"),
        ({"output_mean": -5}, "output_mean"),
        ({"sigma": -0.1}, "sigma"),
        ({"arrival": "onoff", "on_s": 0}, "on_s"),
        ({"arrival": "onoff", "off_s": float("nan")}, "off_s"),
        ({"arrival": "onoff", "off_rate_fraction": 1.5}, "off_rate_fraction"),
        ({"arrival": "onoff", "cv": 2.0}, "cv"),
    ],
)
def test_synthetic_rejects_bad_parameters(kwargs: dict[str, object], parameter: str) -> None:
    arguments: dict[str, object] = {"rate_rps": 1.0, "duration_s": 10.0, "rng": random.Random(0), **kwargs}
    with pytest.raises(ValueError, match=parameter):
        synthetic(**arguments)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------- assign

SPECS = {"small": ModelSpec("small", 4096), "large": ModelSpec("large", 32768)}


def test_assign_respects_shares_on_20k_records() -> None:
    records = synthetic(rate_rps=100, duration_s=200, rng=random.Random(0), prompt_mean=500, output_mean=50)
    records = records[:20_000]
    assert len(records) == 20_000
    requests, rejected = assign(
        records,
        models=[Share("small", 3), Share("large", 1)],
        classes=[(INTERACTIVE, 1.0), (BATCH, 4.0)],
        tenants=[Share("a", 1), Share("b", 1), Share("c", 2)],
        rng=random.Random(1),
    )
    assert rejected == []
    n = len(requests)
    models = Counter(r.model for r in requests)
    classes = Counter(r.slo_class for r in requests)
    tenants = Counter(r.tenant for r in requests)
    # the standard error of a share on 20k draws is at most 0.0036; 0.015 is over 4 sigma
    assert models["small"] / n == pytest.approx(0.75, abs=0.015)
    assert classes["batch"] / n == pytest.approx(0.8, abs=0.015)
    assert tenants["c"] / n == pytest.approx(0.5, abs=0.015)
    assert tenants["a"] / n == pytest.approx(0.25, abs=0.015)


def test_assign_builds_requests_from_records_and_classes() -> None:
    gold = SLOClass("gold", ttft_s=0.5, e2e_s=30.0, weight=3.0, priority=-1)
    records = [TraceRecord(2.0, 300, 40), TraceRecord(3.5, 10, 5000)]
    requests, rejected = assign(
        records, models=[Share("m", 1)], classes=[(gold, 1)], rng=random.Random(0), id_prefix="job-"
    )
    assert rejected == []
    first, second = requests
    assert (first.id, first.model, first.prompt_tokens, first.arrival_time) == ("job-0", "m", 300, 2.0)
    assert (first.true_output_tokens, first.max_tokens, first.tenant) == (40, 2048, "default")
    assert (first.slo_class, first.priority, first.weight) == ("gold", -1, 3.0)
    assert (first.slo.ttft_deadline, first.slo.e2e_deadline) == (2.5, 32.0)
    assert second.id == "job-1"
    assert second.max_tokens == 5000  # never below the true output length


def test_assign_clips_max_tokens_to_the_context() -> None:
    records = [TraceRecord(0.0, 4000, 50), TraceRecord(1.0, 1000, 50), TraceRecord(2.0, 30_000, 100)]
    requests, rejected = assign(
        records,
        models=[Share("small", 1)],
        classes=[(INTERACTIVE, 1)],
        rng=random.Random(0),
        model_specs=SPECS,
    )
    assert [r.max_tokens for r in requests] == [96, 2048]  # 4096 - 4000; the client's 2048 fits
    assert [r.id for r in requests] == ["r0", "r1"]
    assert [(j.index, j.error.field) for j in rejected] == [(2, "prompt_tokens")]


def test_assign_rejects_what_cannot_fit_and_drops_nothing() -> None:
    records = [
        TraceRecord(0.0, 100, 10),  # fits
        TraceRecord(1.0, 4096, 10),  # the prompt alone fills the context
        TraceRecord(2.0, 4000, 200),  # the true output does not fit beside the prompt
        TraceRecord(3.0, 5000, 10),  # the prompt exceeds the context
        TraceRecord(4.0, 4095, 1),  # exactly fits, with max_tokens clipped to 1
    ]
    requests, rejected = assign(
        records, models=[Share("small", 1)], classes=[(BATCH, 1)], rng=random.Random(0), model_specs=SPECS
    )
    assert [r.id for r in requests] == ["r0", "r4"]
    assert requests[1].max_tokens == 1
    assert all(isinstance(j, Rejected) for j in rejected)
    assert [(j.index, j.error.field) for j in rejected] == [
        (1, "prompt_tokens"),
        (2, "max_tokens"),
        (3, "prompt_tokens"),
    ]
    assert len(requests) + len(rejected) == len(records)


def test_assign_is_deterministic_and_dimensions_draw_independently() -> None:
    records = synthetic(rate_rps=10, duration_s=100, rng=random.Random(2))
    models = [Share("small", 1), Share("large", 1)]
    classes = [(INTERACTIVE, 1.0), (BATCH, 1.0)]

    def run(seed: int, tenants: Sequence[Share] = ()) -> list[tuple[str, str, str]]:
        requests, _ = assign(
            records, models=models, classes=classes, rng=random.Random(seed), tenants=tenants
        )
        return [(r.model, r.slo_class, r.tenant) for r in requests]

    assert run(4) == run(4)
    assert run(4) != run(5)
    # adding tenants does not reshuffle which model and class each record gets
    with_tenants = run(4, [Share("x", 1), Share("y", 3)])
    assert [t[:2] for t in with_tenants] == [t[:2] for t in run(4)]
    assert {t[2] for t in with_tenants} == {"x", "y"}


def test_assign_rejects_bad_configuration() -> None:
    records = uniform(3)
    rng = random.Random(0)
    with pytest.raises(ValueError, match="not in model_specs: nope"):
        assign(records, models=[Share("nope", 1)], classes=[(BATCH, 1)], rng=rng, model_specs=SPECS)
    with pytest.raises(ValueError, match="models must not be empty"):
        assign(records, models=[], classes=[(BATCH, 1)], rng=rng)
    with pytest.raises(ValueError, match="classes"):
        assign(records, models=[Share("m", 1)], classes=[(BATCH, 0.0)], rng=rng)
    with pytest.raises(ValueError, match="max_tokens"):
        assign(records, models=[Share("m", 1)], classes=[(BATCH, 1)], rng=rng, max_tokens=0)
    with pytest.raises(ValueError, match="share"):
        Share("m", 0)
    with pytest.raises(ValueError, match="name"):
        Share("", 1)
