"""tutorial_images/: every image a README shows exists and is made by tutorial_images/make_figures.py, every
figure that script makes is shown in a README, and the script, run again, makes each of them."""

import re
import sys

import pytest
from PIL import Image

from helpers import REPO, run

sys.path.insert(0, str(REPO / "tutorial_images"))
import make_figures  # noqa: E402

IMAGES = REPO / "tutorial_images"
READMES = [path for path in REPO.glob("**/README.md") if ".venv" not in path.parts and ".git" not in path.parts]


def shown_images():
    """(README, image path) of every markdown image ![...](...) of every README."""
    for readme in READMES:
        for target in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", readme.read_text()):
            yield readme, (readme.parent / target).resolve()


def test_every_image_a_readme_shows_exists_and_is_made_by_the_script():
    shown = list(shown_images())
    assert shown, "no README shows an image"
    for readme, image in shown:
        where = f"{readme.relative_to(REPO)} shows {image}"
        assert image.exists(), f"{where}, which does not exist: run python tutorial_images/make_figures.py"
        assert image.parent == IMAGES and image.name in make_figures.FIGURES, f"{where}, not made by the script"


def test_every_figure_is_shown_and_nothing_else_lies_in_tutorial_images():
    shown = {image.name for _, image in shown_images() if image.parent == IMAGES}
    assert set(make_figures.FIGURES) - shown == set(), "figures that no README shows"
    assert {path.name for path in IMAGES.glob("*.png")} == set(make_figures.FIGURES), (
        "tutorial_images/ holds exactly the script's figures"
    )


@pytest.mark.slow
def test_the_script_makes_every_figure_again(tmp_path):
    """Same names and sizes as the committed figures (pixels can differ between matplotlib versions)."""
    command = [sys.executable, IMAGES / "make_figures.py", "--out_dir", tmp_path]
    result = run(command, timeout=300)
    assert result.returncode == 0, result.stderr
    assert {path.name for path in tmp_path.glob("*.png")} == set(make_figures.FIGURES)
    for name in make_figures.FIGURES:
        assert Image.open(tmp_path / name).size == Image.open(IMAGES / name).size, name
