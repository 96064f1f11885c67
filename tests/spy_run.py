"""Run a stage's train.py as `python train.py ...` runs it, and record what only the inside of the run sees, for
tests/test_inside_a_run.py: the samples each loader of this process asks for (the sampler's whole order, each
time an epoch's iteration starts, and a fingerprint of torch's random generator then), and whether this process
generated data. Nothing in the stage is changed.

    python tests/spy_run.py <record.json> stages/06_ddp/train.py --config test ...
    torchrun --standalone --nproc_per_node 2 tests/spy_run.py <record>.json stages/06_ddp/train.py ...

Each process writes <record>-rank<RANK>.json when it exits (RANK as the launcher sets it, else 0)."""

import atexit
import json
import os
import runpy
import sys
from pathlib import Path

record_file, script, *arguments = sys.argv[1:]
script = Path(script).resolve()
sys.path[:0] = [str(script.parent), str(script.parents[1])]  # as the stage finds its own modules and `common`

import torch  # noqa: E402
import torch.utils.data  # noqa: E402

import common.data  # noqa: E402  (the stage imports the same module objects)
from helpers import rng_fingerprint  # noqa: E402  (tests/, this script's folder, is first on sys.path)

record = {"loaders": [], "generated": []}


def spy_on_iter(original):
    def __iter__(loader):
        items = list(loader.sampler)  # the order this iteration asks for (samplers here are pure functions of state)
        epochs = {item[0] for item in items if isinstance(item, tuple)} or {getattr(loader.dataset, "epoch", None)}
        indices = [item[1] if isinstance(item, tuple) else item for item in items]
        epoch = epochs.pop() if len(epochs) == 1 else sorted(epochs)
        generator = rng_fingerprint(torch.get_rng_state())  # before the iterator draws its workers' seed from it
        record["loaders"].append({"split": loader.dataset.path.stem, "epoch": epoch, "indices": indices,
                                  "torch_rng": generator})  # fmt: skip
        return original(loader)

    return __iter__


def spy_on_generate(original):
    def generate(preset, out_dir, *args, **kwargs):
        record["generated"].append(str(out_dir))
        return original(preset, out_dir, *args, **kwargs)

    return generate


def write_record():
    rank = os.environ.get("RANK", "0")
    Path(f"{record_file.removesuffix('.json')}-rank{rank}.json").write_text(json.dumps(record))


torch.utils.data.DataLoader.__iter__ = spy_on_iter(torch.utils.data.DataLoader.__iter__)
common.data.generate = spy_on_generate(common.data.generate)
atexit.register(write_record)
sys.argv = [str(script), *arguments]
runpy.run_path(str(script), run_name="__main__")
