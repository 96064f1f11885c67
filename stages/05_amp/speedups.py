"""The long, self-contained parts of stage 05's cheaper step: the TF32 switches, in both of PyTorch's APIs, and
the one-line message of a torch.compile that fails. Later stages copy this file unchanged.
"""

import torch


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
