"""benchmarks/beyond_memory.py's summary: medians per (arm, limit), and no reader rate where nothing streamed."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from beyond_memory import GB, summarize  # noqa: E402 - the benchmarks folder


def _endor(s: float, read_s: float, disk: float = 2 * GB) -> dict:
    return {"finished": True, "peak_bytes": 3 * GB, "disk_read_bytes": disk, "s_per_token": s, "tokens": 3,
            "passes": 4, "read_s": read_s, "bytes_per_pass": 0.5 * GB}


def test_streamed_runs_get_the_reader_rate():
    (row,) = summarize({("endor-q4_0-buffered", 2.6): [_endor(1.0, 1.0), _endor(3.0, 4.0)]}, disk=1.0)
    assert row["finished"] == "2/2"
    assert row["s_per_token"] == 2.0
    assert row["disk_bytes_per_token"] == pytest.approx(0.5 * GB)
    # 0.5 GB x 4 passes over 1 s and over 4 s: median of 2.0 and 0.5 GB/s
    assert row["reader_GBps"] == pytest.approx(1.25)
    assert row["reader_pct_of_disk"] == pytest.approx(125)


def test_all_resident_runs_have_no_reader_rate():
    # a limit above the model: every layer resident, the I/O thread never read (the in-RAM comparison)
    (row,) = summarize({("endor-q8_0-buffered", 20.0): [_endor(0.7, 0.0), _endor(0.8, 0.0)]}, disk=1.0)
    assert row["s_per_token"] == pytest.approx(0.75)
    assert "reader_GBps" not in row


def test_llamacpp_runs_have_no_reader_rate_and_count_tokens():
    run = {"finished": True, "peak_bytes": 3 * GB, "disk_read_bytes": 3 * GB, "s_per_token": 0.5, "tokens": 3}
    (row,) = summarize({("llamacpp-q4_0-mmap", 3.6): [run, {**run, "finished": False}]}, disk=1.0)
    assert row["finished"] == "1/2"
    assert row["disk_bytes_per_token"] == pytest.approx(GB)
    assert "reader_GBps" not in row
