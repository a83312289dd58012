"""The exercise machinery never raises on a learner's code; it prints one status line."""

import numpy as np

from minillm.exercises import check, expect_equal, first_mismatch


def case_for(fn):
    def case():
        x = np.linspace(-2, 2, 12).reshape(3, 4)
        expect_equal(fn(x), np.tanh(x), what="tanh(x)")
    return case


def stub(x):
    raise NotImplementedError


def test_untouched_stub_reports_not_attempted(capsys):
    check("Exercise 0.1 (tanh)", [case_for(stub)])
    assert capsys.readouterr().out == (
        "Exercise 0.1 (tanh): not attempted yet - replace the `raise NotImplementedError` above with your code.\n")


def test_correct_answer_passes(capsys):
    check("Exercise 0.1 (tanh)", [case_for(np.tanh)])
    assert capsys.readouterr().out == "Exercise 0.1 (tanh): passed ✓\n"


def test_wrong_answer_names_the_first_mismatch_and_the_hint(capsys):
    check("Exercise 0.1 (tanh)", [case_for(np.tanh), case_for(np.sin)], hint="use np.tanh")
    out = capsys.readouterr().out
    x = np.linspace(-2, 2, 12).reshape(3, 4)
    assert out.startswith(f"Exercise 0.1 (tanh): not yet ✗ - case 2: tanh(x): first mismatch at index (0, 0): "
                          f"expected {np.tanh(x[0, 0]):.6g}, got {np.sin(x[0, 0]):.6g}")
    assert out.endswith("\n    hint: use np.tanh\n")


def test_crashing_answer_is_reported_not_raised(capsys):
    check("Exercise 0.1 (tanh)", [case_for(lambda x: x @ np.ones((5, 5)))])
    assert "not yet ✗ - case 1: your code raised ValueError" in capsys.readouterr().out


def test_first_mismatch_handles_shapes_and_exact_values():
    assert first_mismatch(np.zeros(3), np.zeros((3, 1))) == "expected shape (3, 1), got shape (3,)"
    assert first_mismatch([1, 2, 3], [1, 2, 3]) is None
    assert first_mismatch("ab", "ac") == "expected 'ac', got 'ab'"
    assert first_mismatch(np.float32(1.0), 1.0 + 1e-9) is None
