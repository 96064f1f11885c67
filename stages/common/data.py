"""Generated data on disk and the Dataset that reads it, with the problem's symmetries as augmentations."""

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .fields import PRESETS, fingerprint, generate
from .run import UserError, output_root

log = logging.getLogger(__name__)


def data_dir_for(preset, data_root=None):
    """Where a preset lives: data_root/<preset>, by default $SCRATCH/<repo>/data or data/generated."""
    if preset not in PRESETS:
        raise UserError(f"unknown data preset {preset!r}: choose one of {', '.join(PRESETS)}")
    root = Path(data_root) if data_root else output_root("data", default=Path("data/generated"))
    return root / preset


def ensure_data(preset, data_root=None, seed=0):
    """Return the folder of a preset, generating it first if it is missing (and saying so)."""
    folder = data_dir_for(preset, data_root)
    if not folder.exists():
        log.info(f"data preset {preset!r} not found in {folder}: generating it now (once)")
        try:
            generate(preset, folder, seed=seed, log=log.info)
        except OSError as error:
            raise UserError(f"cannot write data to {folder} ({error.strerror}): pass --data_root DIR") from None
    meta = check_data(folder, preset)
    if meta["seed"] != seed:
        raise UserError(f"{folder} holds data of seed {meta['seed']}, not {seed}: pass another --data_root")
    if "fingerprint" not in meta:  # data generated before fingerprints existed: computed once, then stored
        log.info(f"computing the fingerprint of the data in {folder} (once)")
        meta["fingerprint"] = fingerprint(folder)
        tmp = folder / f".meta.json.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        tmp.replace(folder / "meta.json")
    return folder


def check_data(folder, preset=None):
    """The data's description (meta.json), after checking that the folder holds complete data of `preset` (its
    own description and the files' shapes); else a UserError naming the fix."""
    folder = Path(folder)
    preset = preset or folder.name
    fix = f"delete it and run: python data/generate.py --preset {preset} --data_root {folder.parent}"
    try:
        meta = json.loads((folder / "meta.json").read_text())
        for split in ("train", "val"):
            array = np.load(folder / f"{split}.npy", mmap_mode="r")
            expected = (meta[f"n_{split}"], 2, meta["grid"], meta["grid"])
            if array.shape != expected:
                raise ValueError(f"{split}.npy has shape {array.shape}, expected {expected}")
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"data in {folder} are missing or corrupt ({error}); {fix}") from None
    described = {"preset": meta.get("preset"), **{key: meta.get(key) for key in PRESETS.get(preset, {})}}
    expected = {"preset": preset, **PRESETS.get(preset, {})}
    if described != expected:
        differences = ", ".join(f"{key} {described[key]} there" for key in expected if described[key] != expected[key])
        raise UserError(f"{folder} does not hold preset {preset!r} ({differences}, {expected} expected); {fix}")
    return meta


def data_identity(meta):
    """What makes these data these data: stored in every checkpoint, compared when a run resumes."""
    return {key: meta.get(key) for key in ("preset", "seed", "grid", "n_train", "n_val", "fingerprint")}


def check_data_finite(folder):
    """After a loss that is not finite: a UserError if the data themselves hold a NaN or an infinity, naming where
    (a learning rate cannot fix that). Reads every file once: for that error, not for every start."""
    where = find_non_finite(folder)
    if where:
        raise UserError(f"the data hold a value that is not a finite number ({where} in {folder}): they are corrupt, "
                        f"not the training; delete the folder and generate them again (python data/generate.py "
                        f"--preset {Path(folder).name} --data_root {Path(folder).parent})")  # fmt: skip


def find_non_finite(folder):
    """Where the data files hold a NaN or an infinity ('train.npy, sample 17, field delta'), or None."""
    meta = json.loads((Path(folder) / "meta.json").read_text())
    for split in ("train", "val"):
        array = np.load(Path(folder) / f"{split}.npy", mmap_mode="r")
        for first in range(0, len(array), 1024):
            chunk = np.asarray(array[first : first + 1024])
            bad = ~np.isfinite(chunk.reshape(len(chunk), 2, -1)).all(axis=-1)  # (sample, field): any value not finite
            if bad.any():
                sample, field = np.argwhere(bad)[0]
                return f"{split}.npy, sample {first + sample}, field {meta['channels'][field]}"
    return None


class FieldDataset(Dataset):
    """(delta, phi) pairs, each of shape (1, grid, grid), read from a memory-mapped .npy file.

    With augment=True each sample gets a random symmetry of the periodic square (one of 4 rotations,
    a flip, a shift). Its randomness is fixed by (seed, epoch, index): the same sample gets the same
    transform however many processes or workers load it, and a resumed run sees the same data.

    The epoch is set with set_epoch, or comes with the index as an (epoch, index) pair from a sampler:
    DataLoader workers hold their own copy of the Dataset, so set_epoch in the main process does not
    reach workers that are already running (persistent_workers=True)."""

    def __init__(self, folder, split, augment=False, seed=0):
        self.path = Path(folder) / f"{split}.npy"
        self.meta = check_data(folder)
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.array = None  # opened lazily, so each DataLoader worker maps the file itself

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.meta[f"n_{self.path.stem}"]

    def __getstate__(self):  # never pickle the mapped array into workers: they reopen the file
        return {**self.__dict__, "array": None}

    def __getitem__(self, item):
        epoch, index = item if isinstance(item, tuple) else (self.epoch, item)
        if self.array is None:
            self.array = np.load(self.path, mmap_mode="r")
        pair = torch.from_numpy(np.array(self.array[index]))  # copy one sample out of the page cache
        if self.augment:
            pair = random_symmetry(pair, self.sample_generator(epoch, index))
        return pair[0:1], pair[1:2]

    def sample_generator(self, epoch, index):
        seed = np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0]
        return torch.Generator().manual_seed(int(seed))


def random_symmetry(fields, generator):
    """Apply the same random rotation, flip and periodic shift to every channel of (C, H, W)."""
    turns, flip, shift_y, shift_x = (
        torch.randint(n, (1,), generator=generator).item() for n in (4, 2, fields.shape[-2], fields.shape[-1])
    )
    fields = torch.rot90(fields, turns, dims=(-2, -1))
    if flip:
        fields = torch.flip(fields, dims=(-1,))
    return torch.roll(fields, shifts=(shift_y, shift_x), dims=(-2, -1))
