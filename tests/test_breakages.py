"""tests/breakages.py, the maintainer's check that the tests catch small breakages of what they guard: its smallest
form here (one cheap breakage, tried four ways), and every breakage in its list still applies to today's code."""

import re

import breakages

from helpers import REPO

THREADS = breakages.Breakage("threads", "stages/common/run.py", 'os.environ.get("OMP_NUM_THREADS", "1")',
                             'os.environ.get("OMP_NUM_THREADS", "2")',
                             ["tests/test_config.py::test_the_cpu_thread_rule_is_fixed_and_follows_only_omp_num_threads"],
                             "assert")  # fmt: skip


def test_the_script_says_caught_not_caught_caught_elsewhere_and_no_longer_applies(tmp_path):
    copy = breakages.scratch_copy(tmp_path)
    unguarded = THREADS._replace(tests=["tests/test_config.py::test_abbreviated_options_are_refused"])
    elsewhere = THREADS._replace(expect="a reason nobody prints")
    gone = THREADS._replace(old="text that is not in the file")
    statuses = [breakages.try_breakage(breakage, copy)[0] for breakage in (THREADS, unguarded, elsewhere, gone)]
    assert statuses == ["caught", "NOT caught", "caught elsewhere", "no longer applies"]
    assert (copy / THREADS.file).read_text() == (REPO / THREADS.file).read_text(), "each breakage is undone"


def test_every_breakage_still_applies_and_names_tests_that_exist():
    """A rewrite of the code that removes a breakage's text must rewrite the breakage for the new code, or the
    check silently tries less."""
    assert len({breakage.name for breakage in breakages.BREAKAGES}) == len(breakages.BREAKAGES)
    for breakage in breakages.BREAKAGES:
        assert (REPO / breakage.file).read_text().count(breakage.old) == 1, breakage.name
        for test in breakage.tests:
            file, _, name = test.partition("::")
            assert (REPO / file).exists(), test
            function = re.sub(r"\[.*\]$", "", name)
            assert not function or f"def {function}(" in (REPO / file).read_text(), test
