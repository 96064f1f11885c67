"""The tour runs every stage in its `quick` config and prints one table with a row for each; every `quick`
run beats the physics baseline (the first table a learner sees must not say the network loses to it)."""

from helpers import REPO, STAGES, output_of, run_python


def test_tour_runs_every_stage_and_each_beats_the_baseline(tmp_path):
    result = run_python(REPO / "stages" / "run_all.py", "--out_dir", tmp_path / "tour", cwd=tmp_path)
    assert result.returncode == 0, output_of(result)
    table = result.stdout.split("The tour, config 'quick'")[1]
    print(table)
    assert "samples/s" in table and "rel. L2 (baseline)" in table and "beats baseline" in table
    for stage in STAGES:
        row = next(line for line in table.splitlines() if line.startswith(stage.name))
        assert "failed" not in row and "CPU" in row, row
        assert row.split()[6] == "yes", f"{stage.name}'s quick run does not beat the physics baseline: {row}"
        assert (tmp_path / "tour" / stage.name / "summary.json").exists()
