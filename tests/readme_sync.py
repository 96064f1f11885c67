"""The parts of the READMEs that are computed, never typed: stage diffs and the table of measured runs.

Each stage README holds its "What changed" diff (of train.py, and of any other file copied from the stage before
that it changed) between diff markers; the top-level README holds a table
of the reference runs in example_logs/ (read from their summary.json files) between table markers.

Stage 02's diff starts from the notebook's code cells, as `jupyter nbconvert --to script --no-prompt
--TemplateExporter.exclude_markdown=True` writes them; every later stage's diff starts from the stage before.
tests/test_docs.py checks that both are current, and

    python tests/readme_sync.py --write

rewrites them after you change a stage or add a reference run.
"""

import difflib
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = REPO / "stages"
DIFF_START, DIFF_END = "<!-- diff: start -->", "<!-- diff: end -->"
TABLE_START, TABLE_END = "<!-- runs table: start -->", "<!-- runs table: end -->"
OUTPUT_START, OUTPUT_END = re.compile(r"<!-- output: (\S+) -->"), "<!-- output: end -->"


def stage_dirs():
    return sorted(p for p in STAGES.iterdir() if p.is_dir() and p.name[:2].isdigit())


def notebook_as_script(notebook):
    from nbconvert import ScriptExporter

    exporter = ScriptExporter(exclude_markdown=True, exclude_input_prompt=True, exclude_output_prompt=True)
    script, _ = exporter.from_filename(str(notebook))
    return script


def previous_source(stage):
    """(label, text) of what this stage's train.py is compared with, or None for the first stage."""
    stages = stage_dirs()
    index = stages.index(stage)
    if index == 0:
        return None
    previous = stages[index - 1]
    if (previous / "train.py").exists():
        path = previous / "train.py"
        return str(path.relative_to(REPO)), path.read_text()
    notebook = previous / "train.ipynb"
    return f"{notebook.relative_to(REPO)} (as a script)", notebook_as_script(notebook)


def expected_diff(stage):
    """The diff of train.py from the stage before, then that of every other .py file that both stages have and this
    one changed (beyond its own name)."""
    before_label, before = previous_source(stage)
    diffs = [unified_diff(before, before_label, stage / "train.py")]
    previous = stage_dirs()[stage_dirs().index(stage) - 1]
    for path in sorted(stage.glob("*.py")):
        if path.name != "train.py" and (previous / path.name).exists():
            before = (previous / path.name).read_text().replace(previous.name, stage.name)
            if before != path.read_text():
                diffs.append(unified_diff(before, str((previous / path.name).relative_to(REPO)), path))
    return "".join(diffs)


def unified_diff(before, before_label, after_path):
    lines = difflib.unified_diff(
        before.splitlines(keepends=True),
        after_path.read_text().splitlines(keepends=True),
        fromfile=before_label,
        tofile=str(after_path.relative_to(REPO)),
    )
    return "".join(lines)


def runs_table():
    """A markdown table of every reference run in example_logs/, from its summary.json."""
    import json

    sys.path.insert(0, str(STAGES))
    import common

    lines = [
        "| run | stage | config | hardware | samples/s | data wait | val rel. L2 (baseline) | wall time | date |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for summary_file in sorted((REPO / "example_logs").rglob("summary.json")):
        if summary_file.relative_to(REPO / "example_logs").parts[0].startswith("gpu_truth"):  # a table of its own
            continue
        s = json.loads(summary_file.read_text())
        run = summary_file.parent.relative_to(REPO)
        lines.append(
            f"| [{run.relative_to('example_logs')}]({run}) | {s['stage']} | {s['settings']['config']} | "
            f"{s['hardware']} | "
            f"{s['samples_per_s']:.0f} | {s['data_wait_share']:.0%} | "
            f"{s['val_relative_l2']:.3f} ({s['baseline_relative_l2']:.3f}) | {s['wall_time_s']:.0f} s | "
            f"{common.run_date(summary_file.parent)} |"
        )
    return "\n".join(lines) + "\n"


def between(text, start, end):
    """The text between two marker lines, or None if the markers are missing."""
    match = re.search(re.escape(start) + r"\n(.*?)" + re.escape(end), text, re.S)
    return match.group(1) if match else None


def replace_between(path, start, end, content):
    text = path.read_text()
    if between(text, start, end) is None:
        sys.exit(f"error: {path} has no {start} ... {end} markers: add them where the block goes")
    pattern = re.escape(start) + r".*?" + re.escape(end)
    path.write_text(re.sub(pattern, lambda _: f"{start}\n{content}{end}", text, flags=re.S))
    print(f"updated {path.relative_to(REPO)}")


def output_block(source):
    """An excerpt of a real log (path relative to the repo): every line but most progress lines."""
    lines = (REPO / source).read_text().splitlines()
    progress = [i for i, line in enumerate(lines) if " | epoch " in line and line.split()[1] == "step"]
    keep = [line for i, line in enumerate(lines) if i not in progress[2:-1]]
    if len(progress) > 3:
        keep.insert(progress[2], "...")
    return "```text\n" + "\n".join(keep) + "\n```\n"


def output_blocks(text):
    """(source, shown text) of each output excerpt in a README."""
    pattern = OUTPUT_START.pattern + r"\n(.*?)" + re.escape(OUTPUT_END)
    return re.findall(pattern, text, re.S)


def write_outputs(path):
    text = path.read_text()
    pattern = OUTPUT_START.pattern + r"\n.*?" + re.escape(OUTPUT_END)
    new = re.sub(pattern, lambda m: f"<!-- output: {m.group(1)} -->\n{output_block(m.group(1))}{OUTPUT_END}", text,
                 flags=re.S)  # fmt: skip
    if new != text:
        path.write_text(new)
        print(f"updated {path.relative_to(REPO)}")


def diff_block(stage):
    return f"```diff\n{expected_diff(stage)}```\n"


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(__doc__)
    for stage in stage_dirs()[1:]:
        replace_between(stage / "README.md", DIFF_START, DIFF_END, diff_block(stage))
    replace_between(REPO / "README.md", TABLE_START, TABLE_END, runs_table())
    for readme in REPO.glob("**/README.md"):
        if ".venv" not in readme.parts:
            write_outputs(readme)
