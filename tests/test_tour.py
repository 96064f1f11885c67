"""The tour runs every stage and prints one table with a row for each."""

from helpers import REPO, STAGES, output_of, run_python


def test_tour_runs_every_stage_and_prints_the_table(tmp_path):
    result = run_python(REPO / "stages" / "run_all.py", "--out_dir", tmp_path / "tour", cwd=tmp_path)
    assert result.returncode == 0, output_of(result)
    table = result.stdout.split("The tour, config 'quick'")[1]
    assert "samples/s" in table and "rel. L2 (baseline)" in table
    for stage in STAGES:
        row = next(line for line in table.splitlines() if line.startswith(stage.name))
        assert "failed" not in row and "CPU" in row, row
        assert (tmp_path / "tour" / stage.name / "summary.json").exists()
