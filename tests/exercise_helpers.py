"""What every `test_exercises_chNN.py` needs: a stub, the printed status lines, and the three-answer run.

A check must say "passed ✓" for a right answer, "not attempted yet" for an untouched stub and "not yet ✗" for a
plausible wrong answer; `run_three` feeds it all three in that order.
"""


def stub(*args, **kwargs):
    raise NotImplementedError


def outputs(capsys) -> list[str]:
    """The status lines printed so far, without the hint lines that follow a failure."""
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("Exercise")]


def run_three(check, right, wrong, capsys) -> tuple[str, str, str]:
    check(right)
    check(stub)
    check(wrong)
    return tuple(outputs(capsys))
