"""Soak test of checkpoint-restart: SIGKILL a run (the small `test` config) at random moments, resume, compare.

    python tests/soak_kill.py                      # 20 random kill points on stage 03
    python tests/soak_kill.py --points 50 --stage 03_checkpoint_restart

Each point starts a fresh run, kills it a random delay after a random logged step (a checkpoint is
written every 4 steps, so some kills land inside a write),
resumes it to the end, and checks that the final weights are bit-identical to an uninterrupted run and
that no corrupt checkpoint was ever met. Prints one line per point and the tally.
"""

import argparse
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "stages"))
import torch

import common
from helpers import REPO, output_of
from test_checkpoint import final_weights, kill_and_resume, train


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--points", type=int, default=20)
    parser.add_argument("--stage", default="03_checkpoint_restart")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random kill moments")
    args = parser.parse_args()
    stage = REPO / "stages" / args.stage
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    common.ensure_data("micro", work / "data")
    reference = train(stage, work / "reference", work / "data")
    if reference.returncode != 0:
        sys.exit(output_of(reference))
    expected = final_weights(work / "reference")

    tally = {"identical": 0, "different": 0, "failed": 0}
    for point in range(args.points):
        after_step, delay = rng.choice([8, 16, 24]), rng.uniform(0.0, 0.3)  # steps are ~50 ms apart here
        out_dir = work / f"point{point}"
        try:
            newest_at_kill = kill_and_resume(stage, out_dir, work / "data", after_step, delay)
            weights = final_weights(out_dir)
            same = all(torch.equal(weights[k], expected[k]) for k in expected)
            outcome = "identical" if same else "different"
        except AssertionError as error:
            outcome, newest_at_kill = "failed", "?"
            print(error)
        tally[outcome] += 1
        print(f"point {point + 1}/{args.points}: killed {delay:.2f} s after step {after_step} (newest on disk: "
              f"{newest_at_kill}), "
              f"resumed -> {outcome}")  # fmt: skip
    print(f"tally: {tally['identical']} identical, {tally['different']} different, {tally['failed']} failed"
          f" of {args.points} (work folder {work})")  # fmt: skip
    sys.exit(0 if tally["identical"] == args.points else 1)


if __name__ == "__main__":
    main()
