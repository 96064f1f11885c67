"""Generate the tutorial's data ahead of time (the stages also do it on first use).

    python data/generate.py --preset tiny     # 5 MB, a second
    python data/generate.py --preset full     # 9.1 GB, minutes: where the stages look, $SCRATCH/<repo>/data

Writes <data_root>/<preset>/{train.npy, val.npy, meta.json} atomically; an existing preset is checked and left alone.
"""

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "stages"))
import common


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--preset", choices=common.PRESETS, default="small")
    parser.add_argument("--data_root", help="default: $SCRATCH/<repo>/data if $SCRATCH is set, else data/generated")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    folder = common.ensure_data(args.preset, args.data_root, seed=args.seed)
    meta = common.check_data(folder)
    print(
        f"{folder}: preset {args.preset!r}, seed {meta['seed']}, {meta['n_train']} + {meta['n_val']} samples of "
        f"{meta['grid']}x{meta['grid']}, linear-baseline relative L2 error {meta['baseline_rel_l2']:.3f} "
        f"({time.perf_counter() - start:.1f} s)"
    )


if __name__ == "__main__":
    try:
        main()
    except common.UserError as error:
        sys.exit(f"error: {error}")
