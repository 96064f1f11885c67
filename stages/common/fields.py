"""The running example: 2D periodic fields from a numerical solver, with exact ground truth.

Input  delta: a Gaussian random field with power spectrum P(k) ~ k^-3 and unit variance,
              like a (2D, toy) cosmological density contrast.
Target phi:   the potential that solves the Poisson equation  laplacian(phi) = rho - mean(rho)
              for the lognormal density rho = exp(delta - 1/2), solved exactly with FFTs.

The map delta -> phi is nonlinear (the exponential) and nonlocal (the inverse Laplacian),
and it commutes with 90-degree rotations, flips and periodic shifts of the grid: those are
the augmentations. The linear solve (phi from delta instead of rho) is the physics baseline.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

# Size presets: grid size and sample counts. Bytes on disk = samples * 2 fields * grid^2 * 4.
PRESETS = {
    "micro": {"grid": 16, "n_train": 512, "n_val": 128},  # ~1 MB, the test suite's `test` configs
    "tiny": {"grid": 32, "n_train": 512, "n_val": 128},  # ~5 MB, the `quick` configs: generated in a second
    "small": {"grid": 64, "n_train": 4096, "n_val": 512},  # ~150 MB, a laptop CPU
    "full": {"grid": 128, "n_train": 65536, "n_val": 4096},  # ~9 GB, a GPU node: data loading matters
    "bench": {"grid": 128, "n_train": 8192, "n_val": 512},  # full's grid, 1/8 of its samples: stages/gpu_truth.py
}
SPLITS = ("train", "val")
CALIBRATION_SAMPLES = 256  # phi is divided by its std over this many training samples


def wavenumbers_squared(grid):
    """|k|^2 on the rfft2 grid of a periodic box of side 1."""
    ky = 2 * np.pi * np.fft.fftfreq(grid, d=1 / grid)
    kx = 2 * np.pi * np.fft.rfftfreq(grid, d=1 / grid)
    return ky[:, None] ** 2 + kx[None, :] ** 2


def gaussian_random_field(rng, n, grid):
    """n fields with P(k) ~ k^-3, zero mean and unit variance each, shape (n, grid, grid)."""
    noise = rng.standard_normal((n, grid, grid))
    k2 = wavenumbers_squared(grid)
    amplitude = np.zeros_like(k2)
    amplitude[k2 > 0] = k2[k2 > 0] ** -0.75  # sqrt(P) = k^-1.5 = (k^2)^-0.75
    field = np.fft.irfft2(np.fft.rfft2(noise) * amplitude, s=(grid, grid))
    field -= field.mean(axis=(1, 2), keepdims=True)
    return field / field.std(axis=(1, 2), keepdims=True)


def solve_poisson(source):
    """phi with laplacian(phi) = source - mean(source), periodic, zero mean; batched on the last two axes."""
    grid = source.shape[-1]
    k2 = wavenumbers_squared(grid)
    k2[0, 0] = 1.0  # the k=0 mode (the mean) is set to zero below
    phi_k = -np.fft.rfft2(source) / k2
    phi_k[..., 0, 0] = 0.0
    return np.fft.irfft2(phi_k, s=source.shape[-2:])


def density(delta):
    """The lognormal density of a unit-variance field; its mean is 1."""
    return np.exp(delta - 0.5)


def relative_l2(prediction, target):
    """Mean over samples of ||prediction - target|| / ||target||; works for numpy and torch."""
    dims = tuple(range(1, target.ndim))
    error = ((prediction - target) ** 2).sum(dims) ** 0.5
    return (error / (target**2).sum(dims) ** 0.5).mean()


def make_samples(seed, split, first, count, grid):
    """Samples first..first+count-1 of a split as (count, 2, grid, grid) float64: delta, raw phi.

    Each sample has its own random stream, so any chunk is reproducible on its own."""
    split_id = SPLITS.index(split)
    delta = np.stack(
        [
            gaussian_random_field(np.random.default_rng([seed, split_id, i]), 1, grid)[0]
            for i in range(first, first + count)
        ]
    )
    phi = solve_poisson(density(delta))
    return np.stack([delta, phi], axis=1)


def generate(preset, out_dir, seed=0, chunk=1024, log=print):
    """Write a preset to out_dir atomically: build it in a temporary folder, then rename."""
    sizes = PRESETS[preset]
    grid = sizes["grid"]
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir()

    calibration = make_samples(seed, "train", 0, min(CALIBRATION_SAMPLES, sizes["n_train"]), grid)
    phi_scale = float(calibration[:, 1].std())
    for split in SPLITS:
        n = sizes[f"n_{split}"]
        array = np.lib.format.open_memmap(tmp_dir / f"{split}.npy", "w+", np.float32, (n, 2, grid, grid))
        for first in range(0, n, chunk):
            samples = make_samples(seed, split, first, min(chunk, n - first), grid)
            samples[:, 1] /= phi_scale
            array[first : first + len(samples)] = samples
            log(f"  {split}: {first + len(samples)}/{n} samples")
        array.flush()
        del array

    val = np.load(tmp_dir / "val.npy", mmap_mode="r")
    meta = {
        "preset": preset,
        "seed": seed,
        **sizes,
        "phi_scale": phi_scale,
        "baseline_rel_l2": float(relative_l2(linear_baseline(val[:, 0], phi_scale), val[:, 1])),
        "channels": ["delta", "phi / phi_scale"],
    }
    del val
    meta["fingerprint"] = fingerprint(tmp_dir)
    (tmp_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    try:
        tmp_dir.rename(out_dir)
    except OSError:  # somebody else finished the same data first: keep theirs
        shutil.rmtree(tmp_dir)
    return meta


def fingerprint(folder):
    """A short hash of the data files' bytes, computed once, when they are written (it reads them once), and
    stored in meta.json: checkpoints keep it, so a run never resumes on other data."""
    digest = hashlib.blake2b(digest_size=8)
    for split in SPLITS:
        with open(Path(folder) / f"{split}.npy", "rb") as file:
            while chunk := file.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def linear_baseline(delta, phi_scale):
    """The physics baseline: solve laplacian(phi) = delta, the first-order expansion of rho - 1."""
    return solve_poisson(np.asarray(delta, dtype=np.float64)) / phi_scale
