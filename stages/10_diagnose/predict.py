"""Use a checkpoint for inference: load its weights into a plain model and score it on the validation set.

    python stages/10_diagnose/predict.py runs/10_diagnose/quick/checkpoints/best.pt
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
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("checkpoint", help="a step-*.pt or best.pt written by train.py")
    parser.add_argument("--data_preset", help="default: the preset the checkpoint was trained on")
    parser.add_argument("--data_root", help="default: $SCRATCH/<repo>/data or data/generated")
    args = parser.parse_args()
    try:
        settings = torch.load(args.checkpoint, map_location="cpu", weights_only=True)["settings"]
    except Exception as error:
        raise common.UserError(f"cannot read {args.checkpoint} ({type(error).__name__}): name a checkpoint "
                               "written by train.py") from None  # fmt: skip
    preset = args.data_preset or settings["data_preset"]
    if preset != settings["data_preset"]:
        print(f"note: the checkpoint was trained on preset {settings['data_preset']!r}; scoring it on {preset!r}")
    device = common.choose_device()
    model = common.UNet(settings["base_channels"], settings["depth"])
    model = load_weights_for_inference(model, args.checkpoint).to(device).eval()
    val_set = common.FieldDataset(common.ensure_data(preset, args.data_root), "val")
    common.check_depth(settings["depth"], val_set.meta["grid"])
    errors = []
    with torch.no_grad():
        for delta, phi in DataLoader(val_set, batch_size=64):
            errors.append(common.relative_l2(model(delta.to(device)), phi.to(device)).item() * len(phi))
    print(f"{args.checkpoint}: validation relative L2 error {sum(errors) / len(val_set):.3f} "
          f"(linear baseline {val_set.meta['baseline_rel_l2']:.3f}) on preset {preset!r}, "
          f"{common.hardware(device)}")  # fmt: skip


if __name__ == "__main__":
    try:
        main()
    except common.UserError as error:
        sys.exit(f"error: {error}")
