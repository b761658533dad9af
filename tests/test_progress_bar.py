"""The command line's progress bar: one bar a pass, counting that pass's steps, and no other bar."""

import re

from consistory.cli.main import main

STEPS = 10
BAR = re.compile(r"pass (\d) of 2:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)")


def test_each_pass_draws_one_bar_that_only_moves_forward(tmp_path, capsys):
    argv = ["generate", "--model", "tiny", "--steps", str(STEPS), "--height", "64", "--subject", "dog",
            "--prompt", "a dog", "--prompt", "a dog running", "--out", str(tmp_path)]
    assert main(argv) == 0
    drawn = [part for part in re.split(r"[\r\n]", capsys.readouterr().err) if "%|" in part]
    states = [(int(m[1]), int(m[2])) for m in map(BAR.search, drawn) if m]
    assert len(states) == len(drawn), drawn  # every bar drawn is a pass's bar
    assert states == sorted(states), states  # no bar goes back, nor an ended pass's bar comes back empty
    assert {total for _, _, total in (BAR.search(part).groups() for part in drawn)} == {str(STEPS)}
    # Pass 2 resumes where injection starts (step S // 10): its bar opens there, not at 0.
    assert [n for p, n in states if p == 2][0] == STEPS // 10
    assert states[-1] == (2, STEPS)
