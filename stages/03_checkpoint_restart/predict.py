"""Use a checkpoint for inference: load its weights into a plain model and score it on the validation set.

    python stages/03_checkpoint_restart/predict.py runs/03_checkpoint_restart/quick/checkpoints/best.pt
"""

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # find `common` from any working directory
import common


def load_weights_for_inference(model, path):
    """Load a checkpoint's weights into a plain model, also one saved from a DDP-wrapped model (keys start
    with `module.`) or a torch.compile'd one (`_orig_mod.`)."""
    weights = torch.load(path, map_location="cpu", weights_only=True)["model"]
    for prefix in ("module.", "_orig_mod."):
        weights = {key.removeprefix(prefix): value for key, value in weights.items()}
    model.load_state_dict(weights)
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a step-*.pt or best.pt written by train.py")
    parser.add_argument("--data_preset", default="tiny", help="tiny | small | full (default: tiny)")
    parser.add_argument("--data_root", help="default: $SCRATCH/<repo>/data or data/generated")
    args = parser.parse_args()
    try:
        model_config = torch.load(args.checkpoint, map_location="cpu", weights_only=True)["model_config"]
    except Exception as error:
        raise common.UserError(f"cannot read {args.checkpoint} ({type(error).__name__}): name a checkpoint") from None
    device = common.choose_device()
    model = load_weights_for_inference(common.UNet(**model_config), args.checkpoint).to(device).eval()
    val_set = common.FieldDataset(common.ensure_data(args.data_preset, args.data_root), "val")
    errors = []
    with torch.no_grad():
        for delta, phi in DataLoader(val_set, batch_size=64):
            errors.append(common.relative_l2(model(delta.to(device)), phi.to(device)).item() * len(phi))
    print(f"{args.checkpoint}: validation relative L2 error {sum(errors) / len(val_set):.3f} "
          f"(linear baseline {val_set.meta['baseline_rel_l2']:.3f}) on {common.hardware(device)}")  # fmt: skip


if __name__ == "__main__":
    try:
        main()
    except common.UserError as error:
        sys.exit(f"error: {error}")
