"""`python -m minillm doctor` reports every component and fails loudly with a hint."""

import subprocess
import sys

from minillm import doctor


def test_doctor_passes_on_the_course_environment():
    result = subprocess.run([sys.executable, "-m", "minillm", "doctor"], capture_output=True, text=True, timeout=300)
    lines = result.stdout.splitlines()
    assert result.returncode == 0, f"doctor failed on the pinned environment:\n{result.stdout}{result.stderr}"
    for name, _ in doctor.CHECKS:
        assert any(line.startswith("[OK]") and f" {name} " in line for line in lines), f"no [OK] line for {name}"
    assert result.stderr == "", f"doctor should print nothing on stderr, got:\n{result.stderr}"


def test_a_failing_component_prints_fail_with_a_hint_and_exits_1(capsys):
    def broken():
        raise ModuleNotFoundError("No module named 'peft'")

    def too_old():
        raise doctor.CheckFailed("Python 3.9 is too old", "install Python 3.11")

    code = doctor.main([("python", doctor.check_python), ("peft", broken), ("old", too_old)])
    out = capsys.readouterr().out
    assert code == 1
    assert "[OK]   python       Python" in out
    assert "[FAIL] peft         ModuleNotFoundError: No module named 'peft'" in out
    assert "hint: install Python 3.11" in out and "make lab" in out
    assert "1 ok, 2 failed" in out
