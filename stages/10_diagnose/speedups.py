"""The settings of stage 05's cheaper step that train.py reads once: the 16-bit type autocast computes in, the TF32
switches (in both of PyTorch's APIs), and the one-line message of a torch.compile that fails. Later stages copy this
file unchanged.
"""

import torch


def choose_precision(cfg, device):
    """The 16-bit type autocast computes in (None: float32 everywhere); TF32 on or off. --precision auto becomes bf16
    on a GPU that has it, fp16 on an older GPU, float32 on any CPU: bf16 is faster only on a CPU with bf16
    instructions (1.5 times on one with AMX, 5 times slower on one without: see the README), and a run's precision
    must not depend on the node it resumes on. cfg.precision then names the choice, which checkpoints record."""
    if cfg.precision == "auto":
        cfg.precision = "fp32" if device.type != "cuda" else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    use_tf32(cfg.tf32)
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]


def use_tf32(enabled):
    """TF32: float32 matrix products and convolutions on the tensor cores of an A100 or newer, with a 10-bit
    mantissa. Every switch of both of PyTorch's APIs: the old allow_tf32 flags, then (PyTorch 2.9 and newer) the
    fp32_precision ones. With only some of the new ones set, reading the old flags raises (PyTorch 2.14)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        precision = "tf32" if enabled else "ieee"
        torch.backends.cuda.matmul.fp32_precision = precision
        torch.backends.cudnn.conv.fp32_precision = precision
        torch.backends.cudnn.rnn.fp32_precision = precision


def compile_failure(error):
    """One line for torch.compile failing (no C++ compiler on a CPU, no working Triton on a GPU), or None."""
    if not type(error).__module__.startswith(("torch._inductor", "torch._dynamo")):
        return None
    lines = [line for line in str(error).splitlines() if line.strip() and not line.startswith(("backend=", "Set "))]
    reason, text = (lines or [type(error).__name__])[0], str(error)
    need = "a C++ compiler (g++)" if "Cxx" in text or "C++" in text else "a working compiler toolchain"
    need = "a working Triton (pip install triton)" if "triton" in text.lower() else need
    return f"--compile true failed ({reason}): it needs {need}; install it, or pass --compile false"
