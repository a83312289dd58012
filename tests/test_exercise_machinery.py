"""The exercise machinery every chapter shares: registry, staged hints, `use()` and the `exercises` command."""

import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import minillm.exercises as ex
from minillm.exercises import Mismatch, check, exercise, first_mismatch, hint, use

ROOT = Path(__file__).resolve().parents[1]

# A throwaway module standing in for a package module with one swappable function and one method.
target = types.ModuleType("minillm_plugin_target")
target.double = lambda x: 2 * x


class Box:
    def size(self):
        return 1

    @staticmethod
    def unit():
        return 1


target.Box = Box
sys.modules[target.__name__] = target


@pytest.fixture
def registered(monkeypatch):
    ex.all_exercises()  # import every chapter's checks first, so none registers into the throwaway copy
    monkeypatch.setattr(ex, "EXERCISES", dict(ex.EXERCISES))
    monkeypatch.setattr(ex, "_failures", {})
    monkeypatch.setattr(ex, "_more_hints", {})
    exercise("99.1", "double", kind="build", component="double", replaces=f"{target.__name__}:double")(lambda f: f)
    exercise("99.2", "box size", kind="build", component="box_size", replaces=f"{target.__name__}:Box.size")(lambda f: f)
    exercise("99.3", "unit", kind="build", component="unit", replaces=f"{target.__name__}:Box.unit")(lambda f: f)


def test_first_mismatch_names_a_missing_answer():
    assert first_mismatch(None, np.zeros(5)) == "expected an array of shape (5,), got None"
    assert first_mismatch("soft", np.zeros((2, 3))) == "expected an array of shape (2, 3), got 'soft'"
    assert first_mismatch(None, 3) == "expected a number, got None"
    assert first_mismatch(np.ones(2), np.ones(2)) is None


def test_use_swaps_and_restores_a_function_a_method_and_a_staticmethod(registered):
    original, original_size, original_unit = target.double, vars(Box)["size"], vars(Box)["unit"]
    with use(double=lambda x: 3 * x, box_size=lambda self: 7, unit=lambda: 5):
        assert target.double(2) == 6 and Box().size() == 7 and Box.unit() == 5 and Box().unit() == 5
    assert target.double is original and vars(Box)["size"] is original_size and vars(Box)["unit"] is original_unit
    assert target.double(2) == 4 and Box().size() == 1 and Box.unit() == 1


def test_use_restores_on_error_and_lets_the_error_through(registered):
    original = target.double
    with pytest.raises(ZeroDivisionError):
        with use(double=lambda x: x / 0):
            target.double(1)
    assert target.double is original


def test_use_ends_the_block_quietly_on_an_unwritten_stub(registered, capsys):
    def stub(x):
        raise NotImplementedError

    ran_after = []
    with use(double=stub):
        target.double(1)
        ran_after.append(True)
    assert not ran_after and target.double(2) == 4
    assert capsys.readouterr().out == "plug-in skipped: your double (exercise 99.1) is not written yet - this block needs it.\n"


def test_use_refuses_unknown_names_and_non_functions(registered):
    with pytest.raises(ValueError, match="no component named attention_typo; the components are"):
        with use(attention_typo=print):
            pass
    original = target.double
    with pytest.raises(TypeError, match=r"use\(double=...\) needs a function, got int"):
        with use(double=3):
            pass
    assert target.double is original


def test_build_exercises_must_name_what_they_replace():
    with pytest.raises(ValueError, match="needs a component name"):
        exercise("99.9", "nothing", kind="build")
    with pytest.raises(ValueError, match="kind must be 'build' or 'practice'"):
        exercise("99.9", "nothing", kind="homework")


def test_hints_are_staged(registered, capsys):
    def wrong():
        raise Mismatch("expected 1, got 2")

    check("99.1", [wrong], hint="think about it", more="think harder")
    first = capsys.readouterr().out
    check("99.1", [wrong], hint="think about it", more="think harder")
    second = capsys.readouterr().out
    assert first == "Exercise 99.1 (double): not yet ✗ - case 1: expected 1, got 2\n    hint: think about it\n"
    assert second == first + "    more: think harder\n"
    hint("99.1")
    assert capsys.readouterr().out == "Exercise 99.1 (double), more help: think harder\n"


def test_every_registered_component_resolves_to_a_package_attribute():
    found = ex.components()
    for name, entry in found.items():
        owner, attr = ex._owner_and_name(entry.replaces)
        assert callable(vars(owner)[attr]) or isinstance(vars(owner)[attr], staticmethod), f"{name}: {entry.replaces}"


def test_every_chapter_has_a_build_exercise_listed():
    chapters = sorted(int(p.name[:2]) for p in (ROOT / "chapters").glob("*.ipynb"))
    builds = {e.chapter for e in ex.all_exercises() if e.kind == "build"}
    missing = [c for c in chapters if c not in builds]
    assert not missing, f"chapters without a build exercise: {missing}"


def test_exercises_list_command():
    done = subprocess.run([sys.executable, "-m", "minillm", "exercises", "--list"], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].split()[:4] == ["ch", "exercise", "kind", "title"]
    numbers = [line.split()[1] for line in done.stdout.splitlines()[1:-1]]
    assert numbers == [e.number for e in ex.all_exercises()]


def test_exercises_check_reports_a_notebook(tmp_path):
    def cell(source):
        return {"cell_type": "code", "execution_count": None, "id": f"c{abs(hash(source))}", "metadata": {},
                "outputs": [], "source": source}

    nb = {"nbformat": 4, "nbformat_minor": 5, "metadata": {"kernelspec": {"name": "python3", "language": "python",
                                                                           "display_name": "Python 3"}},
          "cells": [cell("print('Exercise 42.1 (a): passed ✓')"), cell("1 / 0"),
                    cell("print('Exercise 42.2 (b): not yet ✗ - case 1')")]}
    path = tmp_path / "42_demo.ipynb"
    path.write_text(json.dumps(nb))
    before = path.read_text()
    from minillm.exercises import report

    exercises = [ex.Exercise("42.1", "a"), ex.Exercise("42.2", "b", "build", "b", "x:y"), ex.Exercise("42.3", "c")]
    text = report.check_report(path, exercises)
    assert path.read_text() == before, "--check must not write the notebook"
    lines = text.splitlines()
    assert "passed" in lines[1] and "not yet" in lines[2] and "not attempted" in lines[3]
    assert lines[-1].strip() == "3 exercises: 1 passed, 1 not yet, 1 not attempted"
