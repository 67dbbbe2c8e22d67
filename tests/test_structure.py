"""benchmarks/structure.py: the line counts are the files', the algorithm share follows its stated rule
on a hand-made main block, and the loop position is counted from the block's first line."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from structure import algorithm_share, loop_start  # noqa: E402

HAND_MADE = '''
def helper():
    """not counted: not a main block"""
    fail("x")


if __name__ == "__main__":
    args = parse_args()  # infrastructure: arguments
    if problem:
        fail(problem)  # infrastructure

    # a comment, not counted
    data = load(args)
    policy = build(data)
    for step in progress:  # the loop header is the algorithm
        loss = update(policy, data)
        write_checkpoint(path, policy)  # saving is the algorithm, though it names no infrastructure
        print(loss)  # infrastructure
'''


def test_the_algorithm_share_counts_code_lines_by_the_stated_rule():
    """9 code lines in the main block (the helper, the comment and the blank lines do not count): 3 are
    infrastructure (parse_args, fail, print; `if problem:` is neither), so 6 / 9 are the algorithm."""
    code, share = algorithm_share(HAND_MADE, ["__main__"])
    assert code == 9 and share == pytest.approx(6 / 9)
    assert loop_start(HAND_MADE, "__main__", "for step in progress") == 8


def test_structure_prints_and_saves_every_measure(tmp_path):
    out = tmp_path / "structure.json"
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "structure.py"), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| six core files |" in result.stdout and "algorithm share of the main block" in result.stdout
    measures = json.loads(out.read_text())
    for name, count in measures["lines"].items():
        with open(os.path.join(ROOT, name)) as file:
            assert count == len(file.read().split("\n")) - 1, name
    assert measures["total"] == sum(measures["lines"].values())
    for script in ("uepo_offline.py", "uepo_online.py"):
        assert 0 < measures[f"{script}: main block"]["algorithm_share"] < 1
        assert measures[f"{script}: loop starts"] > 0
