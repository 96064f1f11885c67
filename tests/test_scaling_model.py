"""stages/09_scaling/scaling_model.py against arithmetic done by hand: the ring and two-level all-reduce, DDP's
buckets, the overlap of the all-reduces with backward, a step predicted part by part, strong and weak scaling of a
tiny made-up profile with the impossible points marked; the assumed A100 step; the CLI once on small JSON files."""

import json
import statistics

import pytest

from helpers import REPO, output_of, run_python, stage_module

STAGE = REPO / "stages" / "09_scaling"
MIB = 1024 * 1024
# A made-up one-process profile at batch 16: a 16 ms step, 2 MiB of gradient (two buckets of 1 MiB).
PROFILE = {"world_size": 1, "per_process_batch": 16, "gradient_bytes": 2 * MIB, "hardware": "made up",
           "step_s": 0.016, "parts_s": {"data_wait": 0.001, "forward": 0.004, "backward": 0.008,
                                        "allreduce_exposed": 0.0, "optimizer": 0.002, "other": 0.001}}  # fmt: skip
# One link everywhere: 100 us per ring step, 1 GB/s. A 1 MiB bucket on 2 processes: 2 x 1e-4 + 1 x 1048576 / 1e9.
LINKS = {"intra_latency_s": 1e-4, "intra_bandwidth": 1e9, "inter_latency_s": 1e-4, "inter_bandwidth": 1e9}
BUCKET_ON_2 = 2e-4 + 1048576 / 1e9  # 1.248576e-3 s


@pytest.fixture(scope="module")
def model():
    return stage_module(STAGE, "scaling_model")


def test_a_ring_all_reduce_costs_2_n_minus_1_latencies_and_2_n_minus_1_over_n_of_the_bytes(model):
    # 4 processes, 8 MB at 100 GB/s, 5 us a step: 6 x 5e-6 + 1.5 x 8e6 / 1e11 = 3e-5 + 1.2e-4 = 1.5e-4 s
    assert model.ring_allreduce_s(8e6, 4, 5e-6, 1e11) == pytest.approx(1.5e-4)
    # 2 processes, 1 MB at 1 GB/s, 10 us a step: 2 x 1e-5 + 1 x 1e6 / 1e9 = 1.02e-3 s
    assert model.ring_allreduce_s(1e6, 2, 1e-5, 1e9) == pytest.approx(1.02e-3)
    assert model.ring_allreduce_s(8e6, 1, 5e-6, 1e11) == 0.0


def test_the_two_level_all_reduce_is_a_ring_in_the_node_plus_a_ring_across_nodes_of_a_gpus_share(model):
    links = {"intra_latency_s": 5e-6, "intra_bandwidth": 1e11, "inter_latency_s": 1e-5, "inter_bandwidth": 1e10}
    # 4 nodes of 4 GPUs, 8 MB: within, 1.5e-4 (as above); across, each GPU's 2 MB over 4 nodes at 10 GB/s:
    # 6 x 1e-5 + 1.5 x 2e6 / 1e10 = 6e-5 + 3e-4 = 3.6e-4; together 5.1e-4 s
    assert model.two_level_allreduce_s(8e6, 4, 4, links) == pytest.approx(5.1e-4)
    assert model.two_level_allreduce_s(8e6, 1, 4, links) == pytest.approx(1.5e-4)  # one node: the ring within it
    # one GPU a node: a ring across 4 nodes of the whole 8 MB, 6 x 1e-5 + 1.5 x 8e6 / 1e10 = 1.26e-3 s
    assert model.two_level_allreduce_s(8e6, 4, 1, links) == pytest.approx(1.26e-3)
    assert model.two_level_allreduce_s(8e6, 1, 1, links) == 0.0


def test_the_benchmark_fit_gives_the_latency_of_one_ring_step(model):
    # A = 30 us on 4 processes, 2 x 3 = 6 steps: 5 us a step; 2.5 GB/s = 2.5e9 bytes/s
    benchmark = {"world_size": 4, "fit": {"latency_s": 3e-5, "bus_bandwidth_GBps": 2.5}}
    links = model.links_from_benchmark(benchmark)
    assert links["intra_latency_s"] == links["inter_latency_s"] == pytest.approx(5e-6)
    assert links["intra_bandwidth"] == links["inter_bandwidth"] == pytest.approx(2.5e9)
    benchmark["fit"]["latency_s"] = -1e-6  # a fit's noise below 0: no latency
    assert model.links_from_benchmark(benchmark)["intra_latency_s"] == 0.0


def test_ddp_buckets_are_1_mib_first_then_25_mib(model):
    assert model.bucket_sizes(118564) == [118564]
    assert model.bucket_sizes(MIB) == [MIB]
    assert model.bucket_sizes(7711364) == [MIB, 7711364 - MIB]  # `default`: 1 MiB, then the other 6662788 bytes
    assert model.bucket_sizes(60 * MIB) == [MIB, 25 * MIB, 25 * MIB, 9 * MIB]
    assert model.bucket_sizes(0) == []


def test_the_all_reduces_hide_behind_backward_all_but_the_last_bucket(model):
    # 4 equal buckets ready at 1, 2, 3, 4 s of a 4 s backward, 0.5 s each: only the last one's 0.5 s outlasts it
    assert model.exposed_allreduce_s([100] * 4, [0.5] * 4, 4.0) == pytest.approx(0.5)


def test_nothing_hides_when_the_one_bucket_is_ready_at_the_end_or_backward_takes_no_time(model):
    assert model.exposed_allreduce_s([400], [2.0], 4.0) == pytest.approx(2.0)
    assert model.exposed_allreduce_s([100] * 4, [0.5] * 4, 0.0) == pytest.approx(2.0)


def test_an_all_reduce_waits_for_the_one_before_it(model):
    # ready at 1 and 2 s of a 2 s backward: the first runs 1 -> 4 s, the second waits for it, 4 -> 5 s: 3 s exposed
    assert model.exposed_allreduce_s([100, 100], [3.0, 1.0], 2.0) == pytest.approx(3.0)


def test_one_process_predicts_its_own_profile(model):
    step = model.predict_step(PROFILE, LINKS, 1, 1, 16)
    assert step["step_s"] == pytest.approx(0.016)
    assert step["allreduce_whole_s"] == step["allreduce_exposed"] == 0.0
    assert step["samples_per_s"] == pytest.approx(1000.0)  # 16 / 0.016


def test_two_processes_add_the_last_buckets_all_reduce_part_by_part(model):
    # backward 8 ms: bucket 1 ready at 4 ms, done at 4 + 1.248576; bucket 2 ready at 8 ms, done at 8 + 1.248576
    step = model.predict_step(PROFILE, LINKS, 2, 1, 16)
    assert list(step) == [*model.PARTS, "allreduce_whole_s", "allreduce_hidden_s", "step_s", "samples_per_s"]
    assert step["allreduce_exposed"] == pytest.approx(BUCKET_ON_2)
    assert step["allreduce_whole_s"] == pytest.approx(2 * BUCKET_ON_2)
    assert step["allreduce_hidden_s"] == pytest.approx(BUCKET_ON_2)
    assert step["step_s"] == pytest.approx(0.016 + BUCKET_ON_2)
    assert step["samples_per_s"] == pytest.approx(32 / (0.016 + BUCKET_ON_2))


def test_data_wait_forward_and_backward_scale_with_the_batch_the_rest_stays(model):
    # batch 8: data wait 0.5, forward 2, backward 4 ms; optimizer 2 and other 1 ms; bucket 2 ready at 4 ms
    step = model.predict_step(PROFILE, LINKS, 2, 1, 8)
    assert [step[name] for name in ("data_wait", "forward", "backward", "optimizer", "other")] == pytest.approx(
        [0.0005, 0.002, 0.004, 0.002, 0.001]
    )
    assert step["step_s"] == pytest.approx(0.0095 + BUCKET_ON_2)


def test_gpu_counts_fill_one_node_then_double_the_nodes(model):
    assert model.gpu_counts(4) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert model.gpu_counts(2, max_nodes=4) == [1, 2, 4, 8]
    assert model.gpu_counts(1, max_nodes=4) == [1, 2, 4]


def test_strong_scaling_keeps_the_global_batch_and_marks_what_cannot_be(model):
    rows = model.strong_scaling(lambda batch: PROFILE, LINKS, 32, [1, 2, 64], 2)
    # 1 GPU at batch 32: 2 + 8 + 16 + 2 + 1 = 29 ms; 2 GPUs at 16: 16 ms + the exposed bucket.
    # samples/s = 32 / step, so efficiency(2) = 0.029 / (2 x step(2))
    assert rows[0]["efficiency"] == pytest.approx(1.0)
    assert rows[0]["step_s"] == pytest.approx(0.029)
    assert rows[1]["efficiency"] == pytest.approx(0.029 / (2 * (0.016 + BUCKET_ON_2)))
    assert rows[2]["impossible"] == "32 samples for 64 GPUs: a per-GPU batch of 0"
    assert "step_s" not in rows[2]
    assert model.strong_scaling(lambda batch: PROFILE, LINKS, 6, [4], 2)[0]["impossible"] == (
        "the global batch must divide by the world size (6 by 4)"
    )


def test_weak_scaling_keeps_the_batch_per_gpu_and_spreads_over_nodes(model):
    rows = model.weak_scaling(lambda batch: PROFILE, LINKS, 16, [1, 2, 4], 2)
    assert [(row["gpus"], row["nodes"], row["global_batch"]) for row in rows] == [(1, 1, 16), (2, 1, 32), (4, 2, 64)]
    assert rows[0]["efficiency"] == pytest.approx(1.0)
    assert rows[1]["efficiency"] == pytest.approx(0.016 / (0.016 + BUCKET_ON_2))
    # 2 nodes of 2: a bucket is the ring of 1 MiB in the node plus one of 0.5 MiB across the 2 nodes,
    # 1.248576e-3 + (2e-4 + 524288 / 1e9) = 1.972864e-3 s; again the second one is exposed
    assert rows[2]["allreduce_exposed"] == pytest.approx(1.972864e-3)
    assert rows[2]["efficiency"] == pytest.approx(0.016 / (0.016 + 1.972864e-3))


def test_the_assumed_a100_step_is_the_line_through_the_h100s_two_steps_times_1_5(model):
    def step(batch):
        parts = model.a100_profile(batch, 4)["parts_s"]
        return sum(parts.values())

    # 1.5 x 64 / 2517 = 0.0381406 s; 1.5 x 256 / 6534 = 0.0587695 s; batch 160 halfway between: their mean
    assert step(64) == pytest.approx(1.5 * 64 / 2517)
    assert step(256) == pytest.approx(1.5 * 256 / 6534)
    assert step(160) == pytest.approx((1.5 * 64 / 2517 + 1.5 * 256 / 6534) / 2)
    parts = model.a100_profile(64, 4)["parts_s"]
    assert parts["backward"] == pytest.approx(2 * parts["forward"])


def test_the_perlmutter_report_names_its_assumptions_and_marks_the_impossible(model, capsys):
    model.report_perlmutter()
    out = capsys.readouterr().out
    assert "assumed: 4 A100s a node, NVLink 3: 300 GB/s each way x 0.77 = 231 GB/s bus bandwidth" in out
    assert "impossible: 64 samples for 128 GPUs: a per-GPU batch of 0" in out
    assert "78 % weak-scaling efficiency at 64 per GPU" in out
    assert "64 x the gradient" in out


def test_the_cli_prints_both_tables_from_the_two_json_files(tmp_path):
    (tmp_path / "breakdown.json").write_text(json.dumps(PROFILE))
    benchmark = {"backend": "gloo", "world_size": 2, "nodes": 1, "hardware": "made up",
                 "fit": {"latency_s": 2e-4, "bus_bandwidth_GBps": 1.0}}  # 2e-4 over 2 ring steps: 1e-4 a step
    (tmp_path / "allreduce.json").write_text(json.dumps(benchmark))
    result = run_python(STAGE / "scaling_model.py", "--profile", "breakdown.json", "--allreduce", "allreduce.json",
                        "--global_batch", "6", "--gpus_per_node", "2", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, output_of(result)
    lines = result.stdout.splitlines()
    assert "all-reduce: allreduce.json: gloo, 2 processes on 1 node(s), made up: 100.0 us per ring step" in lines[1]
    assert "impossible: the global batch must divide by the world size (6 by 4)" in result.stdout
    assert "impossible: 6 samples for 8 GPUs: a per-GPU batch of 0" in result.stdout
    weak = lines[lines.index("weak scaling: 16 per GPU, 2 GPUs a node") + 2:]
    # GPUs, nodes, batch, global, step 17.25 ms, all-reduce 2.497 ms whole, 1.249 exposed, 1855 samples/s, 0.93
    assert weak[1].split() == ["2", "1", "16", "32", "17.25", "2.497", "1.249", "1855", "0.93"]
    assert "optimizer steps training needs" in result.stdout


def test_the_readme_figures_come_from_the_committed_outputs(model, capsys):
    """The Perlmutter prediction the README shows (example_logs/09_scaling-laptop-cpu/perlmutter.txt) is what
    scaling_model.py prints today, and the figures the README's text quotes from it, and from the committed
    predict-then-measure run (check.json), are those outputs' own, not typed apart from them."""
    model.report_perlmutter()
    printed = capsys.readouterr().out
    logs = REPO / "example_logs"
    assert printed == (logs / "09_scaling-laptop-cpu" / "perlmutter.txt").read_text()
    readme = " ".join((STAGE / "README.md").read_text().split())  # lines joined: a figure may wrap

    def efficiency(title, gpus):
        table = printed.split(title)[1].split("\n\n")[0]
        row = next(line.split() for line in table.splitlines()[2:] if line.split()[0] == str(gpus))
        return f"{round(100 * float(row[-1]))} %"

    assert f"gives `default` {efficiency('weak scaling: 64 per GPU', 128)} at 32 nodes" in readme
    assert f"strong scaling is poor ({efficiency('strong scaling: global batch 64', 4)} on the 4 GPUs" in readme
    for times in (64, 256):
        line = next(line for line in printed.splitlines() if line.strip().startswith(f"{times} x the gradient"))
        assert f"{round(100 * float(line.split('efficiency ')[1].split(',')[0]))} %" in readme, line
    check = json.loads((logs / "09_scaling-predict-then-measure-cpu" / "check.json").read_text())
    steps = {}
    for case, runs in check.items():
        predicted, measured = (statistics.median(1e3 * run["step_s"] for run in runs[kind]) for kind in runs)
        steps[case] = round(predicted), round(measured), round(100 * (measured / predicted - 1))
    assert (f"{steps['compute'][0]} ms predicted against {steps['compute'][1]} ms measured for `compute` (the two "
            f"processes {steps['compute'][2]} % slower") in readme, steps  # fmt: skip
    assert (f"{steps['communication'][0]} against {steps['communication'][1]} ms for `communication` "
            f"({steps['communication'][2]} %)") in readme, steps  # fmt: skip
