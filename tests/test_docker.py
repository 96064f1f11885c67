"""docker/Dockerfile installs exactly the project's requirements on NVIDIA's PyTorch image. No container engine
runs here, so the Dockerfile is parsed, not built; docker/README.md says so."""

import re

from helpers import REPO

DOCKERFILE = REPO / "docker" / "Dockerfile"
KNOWN = {"FROM", "COPY", "RUN", "WORKDIR", "ENV", "ARG", "LABEL"}


def instructions():
    """(INSTRUCTION, arguments) of each line of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_the_image_is_nvidias_pytorch_plus_requirements_txt_and_nothing_else():
    steps = instructions()
    assert {name for name, _ in steps} <= KNOWN, steps
    assert steps[0][0] == "FROM" and re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", steps[0][1]), steps[0]
    copies = [args.split() for name, args in steps if name == "COPY"]
    assert copies == [["requirements.txt", "/tmp/requirements.txt"]], "only the requirements go into the image"
    installs = [args for name, args in steps if name == "RUN"]
    assert installs == ["pip install --no-cache-dir -r /tmp/requirements.txt"], installs


def test_requirements_txt_is_what_the_stages_need():
    """The same file that the quick start, CI and the image install: every package the stages import is there."""
    names = {re.split(r"[<>=\s]", line)[0].lower() for line in (REPO / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")}  # fmt: skip
    assert {"torch", "torchvision", "numpy", "pyyaml", "tensorboard", "wandb", "jupyterlab", "nbconvert"} <= names
