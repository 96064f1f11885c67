"""stages/09_scaling/bench_allreduce.py: the bus bandwidth convention and the latency-bandwidth fit by hand, then the
bench itself on 2 gloo processes under torchrun, and its one-line refusal without a launcher."""

import json
import re

import pytest

from helpers import REPO, output_of, run_python, stage_module

STAGE = REPO / "stages" / "09_scaling"
SCRIPT = STAGE / "bench_allreduce.py"
# The keys of the JSON file, in order: scaling_model.py and predict_then_measure.py read them.
KEYS = ["backend", "world_size", "nodes", "hardware", "dtype", "repeats", "sizes_bytes", "seconds", "seconds_range",
        "algbw_GBps", "busbw_GBps", "fit"]  # fmt: skip


@pytest.fixture(scope="module")
def bench():
    return stage_module(STAGE, "bench_allreduce")


def test_the_bus_bandwidth_of_an_all_reduce_is_its_algorithm_bandwidth_times_2_n_minus_1_over_n(bench):
    assert bench.bus_bandwidth(10.0, 2) == 10.0
    assert bench.bus_bandwidth(10.0, 4) == 15.0
    assert bench.bus_bandwidth(10.0, 8) == 17.5


@pytest.mark.parametrize("world_size", [2, 4])
def test_the_fit_recovers_the_latency_and_bandwidth_that_made_the_times(bench, world_size):
    latency, bandwidth = 30e-6, 5e9  # 30 us, 5 GB/s
    sizes = [4096, 65536, 1 << 20, 16 << 20, 256 << 20]
    seconds = [latency + 2 * (world_size - 1) / world_size * size / bandwidth for size in sizes]
    assert bench.fit_latency_bandwidth(sizes, seconds, world_size) == pytest.approx((latency, bandwidth), rel=1e-9)


@pytest.mark.slow
def test_two_gloo_processes_print_a_row_per_size_and_the_fit_and_write_the_json(tmp_path):
    out = tmp_path / "allreduce.json"
    result = run_python("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", 2, SCRIPT, "--sizes",
                        "4KB,256KB,1MB", "--repeats", 3, "--warmup", 1, "--out", out, cwd=tmp_path,
                        env={"OMP_NUM_THREADS": "1"}, timeout=120)  # fmt: skip
    assert result.returncode == 0, output_of(result)
    lines = result.stdout.splitlines()
    assert "all_reduce of float32 with gloo: 2 processes on 1 node(s), CPU (" in result.stdout, output_of(result)
    rows = [line.split()[:2] for line in lines if re.match(r"\s+\d+ [KM]B\s+[\d.]+ (us|ms|s)\s", line)]
    assert rows == [["4", "KB"], ["256", "KB"], ["1", "MB"]], output_of(result)
    fit = (r"fit: t = A \+ 2\(n-1\)/n x S / B: latency A = -?[\d.]+ us, bus bandwidth B = -?[\d.]+ GB/s "
           r"\(from sizes 4 KB to 1 MB\)")  # fmt: skip
    assert any(re.match(fit, line) for line in lines), output_of(result)

    saved = json.loads(out.read_text())
    assert list(saved) == KEYS
    assert (saved["backend"], saved["world_size"], saved["nodes"], saved["dtype"], saved["repeats"]) == \
        ("gloo", 2, 1, "float32", 3)  # fmt: skip
    assert saved["sizes_bytes"] == [4096, 262144, 1048576]
    for key in ("seconds", "seconds_range", "algbw_GBps", "busbw_GBps"):
        assert len(saved[key]) == 3, key
    for size, seconds, (low, high), algbw in zip(saved["sizes_bytes"], saved["seconds"], saved["seconds_range"],
                                                 saved["algbw_GBps"]):  # fmt: skip
        assert 0 < low <= seconds <= high
        assert algbw == pytest.approx(size / seconds / 1e9)
    assert saved["busbw_GBps"] == saved["algbw_GBps"]  # 2(n-1)/n = 1 for n = 2
    assert sorted(saved["fit"]) == ["bus_bandwidth_GBps", "latency_s"]
    assert all(isinstance(value, float) for value in saved["fit"].values())


def test_without_a_launcher_it_says_in_one_line_to_start_it_with_torchrun(tmp_path):
    result = run_python(SCRIPT, "--sizes", "4KB,64KB", cwd=tmp_path)
    last_line = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and "Traceback" not in result.stderr, output_of(result)
    assert last_line.startswith("error: ") and "torchrun --standalone" in last_line, output_of(result)
