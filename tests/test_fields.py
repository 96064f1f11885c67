"""The running example: determinism, the physics of the ground truth, the symmetries, the model."""

import json
import pickle

import numpy as np
import pytest
import torch

import common
from common import fields


def spectral_laplacian(field):
    """The Laplacian on a periodic unit box, written independently of the generator (full complex FFT)."""
    grid = field.shape[-1]
    k = 2 * np.pi * np.fft.fftfreq(grid) * grid
    k2 = k[:, None] ** 2 + k[None, :] ** 2
    return np.real(np.fft.ifft2(-k2 * np.fft.fft2(field)))


TRANSFORMS = {
    "rot90": lambda a: np.rot90(a, 1, axes=(-2, -1)),
    "rot180": lambda a: np.rot90(a, 2, axes=(-2, -1)),
    "rot270": lambda a: np.rot90(a, 3, axes=(-2, -1)),
    "flip": lambda a: np.flip(a, axis=-1),
    "shift": lambda a: np.roll(a, (5, 11), axis=(-2, -1)),
}


def test_samples_are_deterministic_per_seed_and_chunk():
    first = fields.make_samples(seed=1, split="train", first=0, count=4, grid=32)
    again = fields.make_samples(seed=1, split="train", first=0, count=4, grid=32)
    chunk = fields.make_samples(seed=1, split="train", first=2, count=2, grid=32)
    other_seed = fields.make_samples(seed=2, split="train", first=0, count=4, grid=32)
    other_split = fields.make_samples(seed=1, split="val", first=0, count=4, grid=32)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first[2:], chunk)
    assert not np.allclose(first, other_seed)
    assert not np.allclose(first, other_split)


def test_generated_files_are_identical_for_the_same_seed(tmp_path):
    common.generate("tiny", tmp_path / "a", seed=3, log=lambda _: None)
    common.generate("tiny", tmp_path / "b", seed=3, chunk=100, log=lambda _: None)
    for name in ("train.npy", "val.npy", "meta.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert not list(tmp_path.glob(".*tmp*")), "the temporary folder must be gone after the rename"


def test_input_is_a_unit_variance_field():
    delta = fields.make_samples(seed=0, split="train", first=0, count=8, grid=64)[:, 0]
    np.testing.assert_allclose(delta.mean(axis=(1, 2)), 0, atol=1e-12)
    np.testing.assert_allclose(delta.std(axis=(1, 2)), 1, rtol=1e-12)


def test_target_solves_the_poisson_equation():
    delta, phi = fields.make_samples(seed=0, split="val", first=0, count=4, grid=64).transpose(1, 0, 2, 3)
    rho = np.exp(delta - 0.5)
    residual = spectral_laplacian(phi) - (rho - rho.mean(axis=(1, 2), keepdims=True))
    assert np.abs(residual).max() < 1e-9 * np.abs(rho).max()
    np.testing.assert_allclose(phi.mean(axis=(1, 2)), 0, atol=1e-12)


def test_stored_target_solves_the_poisson_equation(tiny_data):
    folder = tiny_data / "tiny"
    meta = json.loads((folder / "meta.json").read_text())
    pairs = np.load(folder / "val.npy")[:8].astype(np.float64)
    rho = np.exp(pairs[:, 0] - 0.5)
    residual = spectral_laplacian(pairs[:, 1] * meta["phi_scale"]) - (rho - rho.mean(axis=(1, 2), keepdims=True))
    assert np.abs(residual).max() < 1e-3 * np.abs(rho).max()  # float32 storage


@pytest.mark.parametrize("name", TRANSFORMS)
def test_rotations_flips_and_shifts_are_symmetries(name):
    transform = TRANSFORMS[name]
    delta = fields.make_samples(seed=0, split="train", first=0, count=2, grid=32)[:, 0]
    phi_of_transformed = fields.solve_poisson(fields.density(transform(delta).copy()))
    transformed_phi = transform(fields.solve_poisson(fields.density(delta)))
    np.testing.assert_allclose(phi_of_transformed, transformed_phi, atol=1e-12)


def test_augmented_pairs_still_solve_the_equation(tiny_data):
    dataset = common.FieldDataset(tiny_data / "tiny", "train", augment=True, seed=0)
    scale = dataset.meta["phi_scale"]
    for index in range(6):
        delta, phi = (t[0].double().numpy() for t in dataset[index])
        expected = fields.solve_poisson(fields.density(delta)) / scale
        np.testing.assert_allclose(phi, expected, atol=2e-3 * np.abs(expected).max())


def test_augmentation_depends_on_seed_epoch_and_index_only(tiny_data):
    dataset = common.FieldDataset(tiny_data / "tiny", "train", augment=True, seed=0)
    first = dataset[5][0]
    assert torch.equal(first, dataset[5][0])
    dataset.set_epoch(1)
    assert not torch.equal(first, dataset[5][0])
    plain = common.FieldDataset(tiny_data / "tiny", "train")
    assert torch.equal(plain[5][0][0], torch.from_numpy(np.load(tiny_data / "tiny" / "train.npy")[5, 0]))


def test_dataset_never_pickles_the_mapped_array(tiny_data):
    dataset = common.FieldDataset(tiny_data / "tiny", "train")
    dataset[0]  # maps the file
    assert len(pickle.dumps(dataset)) < 10_000


def test_linear_baseline_is_the_reported_one(tiny_data):
    dataset = common.FieldDataset(tiny_data / "tiny", "val")
    pairs = np.load(tiny_data / "tiny" / "val.npy")
    baseline = common.linear_baseline(pairs[:, 0], dataset.meta["phi_scale"])
    error = common.relative_l2(baseline, pairs[:, 1].astype(np.float64))
    assert error == pytest.approx(dataset.meta["baseline_rel_l2"], rel=1e-5)
    assert 0.3 < error < 0.45


def test_relative_l2():
    target = torch.randn(3, 1, 8, 8)
    assert common.relative_l2(torch.zeros_like(target), target).item() == pytest.approx(1.0)
    assert common.relative_l2(target, target).item() == 0.0


def test_unet_is_periodic():
    """Circular padding: shifting the input by whole coarsest cells shifts the output the same way."""
    torch.manual_seed(0)
    model = common.UNet(base_channels=8, depth=3).eval()
    x = torch.randn(2, 1, 32, 32)
    shift = (4 * 3, 4 * 5)  # multiples of 2**(depth - 1)
    with torch.no_grad():
        shifted_output = model(torch.roll(x, shift, dims=(-2, -1)))
        output_shifted = torch.roll(model(x), shift, dims=(-2, -1))
    assert shifted_output.shape == x.shape
    torch.testing.assert_close(shifted_output, output_shifted, rtol=1e-4, atol=1e-5)
