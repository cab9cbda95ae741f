"""scripts/bench_proxy.py's own arithmetic: what wrk reports and what the CPU per request is
(the benchmark of record must not drift into measuring something else)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_proxy.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_proxy", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_proxy"] = module
    spec.loader.exec_module(module)
    return module


def test_busy_time_is_everything_but_idle_and_iowait(bench: ModuleType) -> None:
    stat = "cpu  100 5 50 1000 40 3 2 0 0 0\ncpu0 1 2 3 4\n"
    assert bench.machine_busy_ticks(stat) == 100 + 5 + 50 + 3 + 2


def test_cpu_per_request_leaves_out_llama_server_and_the_load_generator(
    bench: ModuleType,
) -> None:
    tick = bench.TICK_MS
    # 300 busy ticks, 200 of them llama-server's, wrk used 50 ms, over 100 requests
    assert bench.cpu_ms_per_request(300, 200, 50.0, 100) == pytest.approx((100 * tick - 50) / 100)
    assert math.isnan(bench.cpu_ms_per_request(300, 200, 0.0, 0))  # no requests: no figure


def test_wrks_summary_line_is_read_from_its_output(bench: ModuleType) -> None:
    out = (
        "Running 3s test @ http://x\n"
        'BENCH {"requests": 900, "duration_us": 3000000, "p50_us": 2100, "p99_us": 9000, '
        '"failed": 0, "closed": 4, "non2xx": 1}\n'
    )
    figures = bench.parse_wrk(out)
    assert figures["requests"] == 900 and figures["closed"] == 4 and figures["non2xx"] == 1
    with pytest.raises(RuntimeError, match="no summary"):
        bench.parse_wrk("wrk: connection refused\n")


def test_a_cell_pools_its_rounds(bench: ModuleType) -> None:
    cell = bench.Cell()
    cell.runs.append(bench.Run(100, 1.0, 2.0, 9.0, 0, 0, 1.0))
    cell.runs.append(bench.Run(300, 1.0, 4.0, 11.0, 1, 0, 3.0))
    assert cell.rps == 200.0
    assert cell.cpu == pytest.approx((100 * 1.0 + 300 * 3.0) / 400)
    assert cell.failed == 1
