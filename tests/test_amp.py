"""Stage 05: mixed precision (bf16, fp16 with a loss scale), the TF32 switches and torch.compile, on a CPU.
(That they run on a GPU, and how fast, is measured by stages/compare_speed.py; see the stage README.)"""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from helpers import REPO, SCRIPT_STAGES, assert_resumed_from, output_of, run_python, saved_by_the_stop, stage_module

STAGE = REPO / "stages" / "05_amp"
TF32_STAGES = [stage for stage in SCRIPT_STAGES if (stage / "speedups.py").exists()]  # 05 on


def train(out_dir, data_root, *extra, env=None):
    return run_python(STAGE / "train.py", "--config", "test", "--out_dir", out_dir, "--data_root", data_root,
                      *extra, cwd=out_dir.parent, env=env)  # fmt: skip


def newest_checkpoint(out_dir):
    return torch.load(sorted((out_dir / "checkpoints").glob("step-*.pt"))[-1], weights_only=True)


def summary(out_dir):
    return json.loads((out_dir / "summary.json").read_text())


def test_auto_precision_is_float32_on_a_cpu_and_each_name_maps_to_its_type():
    speedups = stage_module(STAGE, "speedups")
    names = {"auto": ("fp32", None), "fp32": ("fp32", None), "bf16": ("bf16", torch.bfloat16),
             "fp16": ("fp16", torch.float16)}  # fmt: skip
    for name, (chosen, dtype) in names.items():
        cfg = SimpleNamespace(precision=name, tf32=False)
        assert speedups.choose_precision(cfg, torch.device("cpu")) is dtype
        assert cfg.precision == chosen, "the summary and the checkpoints record the choice, not auto"


TF32_CHECK = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from speedups import use_tf32
new_api = hasattr(torch.backends.cuda.matmul, "fp32_precision")
for enabled in (False, True, False):
    use_tf32(enabled)
    assert torch.backends.cuda.matmul.allow_tf32 is enabled and torch.backends.cudnn.allow_tf32 is enabled, enabled
    if new_api:
        word = "tf32" if enabled else "ieee"
        switches = [torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.cudnn.rnn]
        assert [switch.fp32_precision for switch in switches] == [word] * 3, enabled
print("ok")
"""


@pytest.mark.parametrize("stage", TF32_STAGES, ids=[stage.name for stage in TF32_STAGES])
def test_the_tf32_switch_sets_every_flag_both_apis_read(stage, tmp_path):
    """Off, on and off again, in a fresh process (PyTorch's own defaults differ between the switches): the old
    flags, which libraries still read, read back what was set (with the new switches only partly set, reading
    them raised), and so do the new ones."""
    result = run_python("-c", TF32_CHECK, stage, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "ok", output_of(result)


def test_fp16_resume_is_bit_exact_and_keeps_the_loss_scale(tmp_path, tiny_data):
    """The GradScaler's state (the scale, and the count of good steps since it last changed) is part of the
    run: a resumed fp16 run ends with the weights and the scaler of an uninterrupted one. (A smaller U-Net than
    the `test` config's: fp16 is emulated, slowly, on a CPU.)"""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    fp16 = ["--precision", "fp16", "--num_epochs", "1", "--base_channels", "4", "--depth", "2"]
    result = train(whole, tiny_data, *fp16)
    assert result.returncode == 0, output_of(result)
    assert "precision fp16" in result.stdout
    stopped = train(resumed, tiny_data, *fp16, "--signal_at_step", "9")
    assert stopped.returncode == 3, output_of(stopped)
    result = train(resumed, tiny_data, *fp16)
    assert result.returncode == 0, output_of(result)
    assert_resumed_from(result.stdout, saved_by_the_stop(stopped.stdout))

    expected, got = newest_checkpoint(whole), newest_checkpoint(resumed)
    assert expected["scaler"] == got["scaler"]
    assert expected["scaler"]["scale"] < 65536.0, "an overflow halved the starting scale: the scaler did its job"
    assert expected["scaler"]["_growth_tracker"] > 0
    different = [key for key in expected["model"] if not torch.equal(expected["model"][key], got["model"][key])]
    assert not different, f"{len(different)} tensors differ after resume, e.g. {different[:3]}"


def test_bf16_moves_the_losses_a_little(tmp_path, tiny_data, uninterrupted_run):
    """bf16 against float32 on the `test` config (bf16 runs 8 times slower than float32 on a CPU without bf16
    instructions, such as CI's; the README gives the `quick` figures, measured once with stages/run_all.py).
    It changes the losses (autocast did run, in the step and in validation) by a little: the final train loss by
    5.6e-4 relative, the validation loss by 1.8e-4, measured here (torch 2.14, CPU, 2026-12-03, the micro preset).
    The bound, 1 %, is 18 to 56 times those; a step that never runs in bf16 leaves the train loss exactly as
    float32's."""
    result = train(tmp_path / "bf16", tiny_data, "--precision", "bf16")
    assert result.returncode == 0, output_of(result)
    assert summary(tmp_path / "bf16")["settings"]["precision"] == "bf16"
    for key in ("final_train_loss", "final_val_loss"):  # the training steps' losses, and validation's
        bf16, fp32 = (summary(run)[key] for run in (tmp_path / "bf16", uninterrupted_run(STAGE)))
        print(f"{key}: fp32 {fp32:.6g}, bf16 {bf16:.6g}, relative difference {abs(bf16 / fp32 - 1):.2e}")
        assert 0 < abs(bf16 / fp32 - 1) < 0.01, key


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="torch.compile on a CPU needs a C++ "
                    "compiler (apt-get install g++); .ci/run installs one, so CI always runs this test")  # fmt: skip
def test_compile_runs_and_its_checkpoints_load_without_it(tmp_path, tiny_data):
    """A compiled run checkpoints the model's own weights (no `_orig_mod.` prefix), so it resumes uncompiled.
    (A one-level U-Net: compiling the test config's three levels takes 90 s on CI's CPU, this one 20 s.)"""
    out_dir, inductor = tmp_path / "run", tmp_path / "inductor"
    stopped = train(out_dir, tiny_data, "--depth", "1", "--compile", "true", "--signal_at_step", "3",
                    env={"TORCHINDUCTOR_CACHE_DIR": str(inductor)})  # fmt: skip
    assert stopped.returncode == 3, output_of(stopped)
    # It compiled: the C++ that inductor generated for this model's graphs (the log's "compile True" only echoes it)
    assert list(inductor.rglob("*.cpp")) and list(inductor.rglob("*.so")), "nothing was compiled"
    weights = newest_checkpoint(out_dir)["model"]
    assert not [key for key in weights if key.startswith("_orig_mod.")]
    second = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "second")}
    resumed = train(out_dir, tiny_data, "--depth", "1", "--compile", "false", env=second)
    assert resumed.returncode == 0, output_of(resumed)
    assert_resumed_from(resumed.stdout, saved_by_the_stop(stopped.stdout))
    assert not list((tmp_path / "second").rglob("*.cpp")), "the resumed run compiled"  # (torch makes the folder)


COMPILE_STAGES = [TF32_STAGES[0], TF32_STAGES[-1]]  # where torch.compile came in, and the newest


def test_compile_without_a_compiler_is_one_line_that_says_what_to_do(tmp_path, tiny_data):
    """torch.compile on a CPU generates C++: with no working compiler (CXX names none here), one line that names
    the cause and both ways on, no traceback, and nothing trained. (On the newest stage; compile_failure's copies in
    the stages before are checked below, in-process.)"""
    result = run_python(TF32_STAGES[-1] / "train.py", "--config", "test", "--compile", "true", "--num_epochs", "1",
                        "--base_channels", "4", "--depth", "2", "--out_dir", tmp_path / "run", "--data_root",
                        tiny_data, cwd=tmp_path, env={"CXX": str(tmp_path / "no-such-compiler")})  # fmt: skip
    last_line = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and "Traceback" not in result.stderr, output_of(result)
    assert last_line.startswith("error: --compile true failed (InvalidCxxCompiler: ") and "C++ compiler" in last_line
    assert last_line.endswith("install it, or pass --compile false") and not list(tmp_path.rglob("step-*.pt"))


@pytest.mark.parametrize("stage", COMPILE_STAGES, ids=[stage.name for stage in COMPILE_STAGES])
def test_compile_without_triton_on_a_gpu_is_named_too(stage):
    """No GPU here: the errors torch.compile raises on a GPU without Triton, built from PyTorch's own classes; and
    any other error is left to the traceback."""
    from torch._dynamo.exc import BackendCompilerFailed
    from torch._inductor.exc import TritonMissing

    def inductor():
        pass

    error = BackendCompilerFailed(inductor, TritonMissing(first_useful_frame=None), first_useful_frame=None)
    speedups = stage_module(stage, "speedups")
    line = speedups.compile_failure(error)
    assert line.startswith("--compile true failed (TritonMissing: Cannot find a working triton installation."), line
    assert "it needs a working Triton (pip install triton)" in line
    assert speedups.compile_failure(RuntimeError("CUDA out of memory")) is None
