"""The course as a learner meets it: JupyterLab in a real browser, driven by clicks (issue 10).

Run it with `make test-browser`: it installs Debian's Chromium with apt-get when /usr/bin/chromium is missing
(scripts/install_browser.sh, root or sudo) and Playwright from the pinned requirements, then runs this file.
It is not part of `make test` because it needs a system browser and root to install one.

For chapter 00 and chapter 03 (the heavy one: it trains a model behind a progress bar and draws plots) it opens
the notebook, waits for the kernel, clicks Run > Run All Cells and then checks what a learner would see against
the notebook's stored outputs (the ones nbval compares): no error in any cell, nothing unexpected on stderr,
every exercise status line, every figure rendered as an image, progress bars that finished cleanly, the
doctor's table. A full-page screenshot of each notebook lands in tests/e2e/screenshots/ (ignored by git),
taken even when the run fails. The notebook is closed without saving; the server serves a copy of chapters/
anyway (see conftest.py), and the test checks that the copy on disk did not change.
"""

import json
import re
from pathlib import Path

import pytest

CHAPTERS = [  # (notebook, figures it must show at least)
    ("00_welcome", 0),
    ("03_modules_and_optimizers", 1),
]
VIEWPORT = {"width": 1400, "height": 900}
MAX_SCREENSHOT_HEIGHT = 30_000  # px; Chromium renders taller pages, but nobody scrolls through them
KERNEL_READY_TIMEOUT_MS = 90_000
RUN_ALL_TIMEOUT_MS = 180_000    # chapter 03 takes ~15 s alone on 2 cores; generous for a busy CI machine

EXERCISE_STATUS = re.compile(r"^Exercise \d+\.\d+ \([^)]*\): .*$", re.MULTILINE)
BAR_LIKE = re.compile(r"\d+%\|")
FINISHED_BAR = re.compile(r"^[^\n:|]+: 100%\|█+\| (?P<n>\d+)/(?P=n)$")  # minillm.progress.BAR_FORMAT at the end
DOCTOR_LINE = re.compile(r"^\[(OK|FAIL)\] (\S+ *) \S")
DOCTOR_START = re.compile(r"^\[(OK|FAIL)\] python ", re.MULTILINE)
DOCTOR_SUMMARY = re.compile(r"^\d+ ok, (?P<failed>\d+) failed$")

# What the browser shows, per code cell in notebook order: its prompt and its outputs. textContent, not innerText:
# JupyterLab skips painting cells outside the viewport (content-visibility), and innerText of those is empty.
READ_CELLS_JS = """() => [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell')].map(cell => ({
    prompt: cell.querySelector('.jp-InputPrompt').textContent.trim(),
    source: cell.querySelector('.jp-InputArea-editor .cm-line').textContent,
    outputs: [...cell.querySelectorAll('.jp-OutputArea-output')].map(out => ({
        mime: out.dataset.mimeType || '',
        text: out.textContent,
        images: [...out.querySelectorAll('img')].map(img => ({complete: img.complete, width: img.naturalWidth})),
    })),
}))"""

KERNEL_IS_JS = """([name, state]) => [...document.querySelectorAll('.jp-StatusBar-Item')]
    .some(item => item.textContent.trim() === `${name} | ${state}`)"""

# The stored notebook already shows execution counts [1]..[N], so "every prompt has a number" alone would be true
# before Run All starts. Watch for a queued cell ([*]) first; the run is over when that was seen, the kernel is
# idle again and no cell is queued (JupyterLab un-queues the rest when a cell raises).
WATCH_RUN_START_JS = """() => {
    const notebook = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook');
    window.e2eRunStarted = false;
    new MutationObserver((_, observer) => {
        if ([...notebook.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].some(p => p.textContent.trim() === '[*]:')) {
            window.e2eRunStarted = true;
            observer.disconnect();
        }
    }).observe(notebook, {subtree: true, childList: true, characterData: true});
}"""
RUN_ALL_FINISHED_JS = """(name) => {
    const prompts = [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell .jp-InputPrompt')];
    const idle = [...document.querySelectorAll('.jp-StatusBar-Item')].some(i => i.textContent.trim() === `${name} | Idle`);
    return window.e2eRunStarted && idle && prompts.every(p => p.textContent.trim() !== '[*]:');
}"""

SCROLLER = ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-WindowedPanel-outer"


def stored_notebook(lab, name: str) -> dict:
    """The committed notebook: its stored outputs are what nbval checks, so they are what the browser must show."""
    return json.loads((lab.repo / "chapters" / f"{name}.ipynb").read_text())


def stored_streams(notebook: dict, stream: str) -> list[str]:
    """The texts of the notebook's stored 'stdout' or 'stderr' outputs, in order."""
    return ["".join(out["text"]) for cell in notebook["cells"] for out in cell.get("outputs", [])
            if out.get("name") == stream]


def stored_image_count(notebook: dict) -> int:
    return sum("image/png" in out.get("data", {}) for cell in notebook["cells"] for out in cell.get("outputs", []))


def click_menu(page, menu: str, item: str) -> None:
    """Open a main-menu menu and click one of its items by its visible label, as a learner does."""
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(rf"^{re.escape(menu)}$")).click()
    page.locator(".lm-Menu-item:not(.lm-mod-disabled) .lm-Menu-itemLabel",
                 has_text=re.compile(rf"^{re.escape(item)}$")).click()


def open_dialogs(page) -> list[str]:
    return [text.strip() for text in page.locator(".jp-Dialog").all_text_contents()]


def save_screenshot(page, folder: Path, name: str) -> Path:
    """Grow the viewport until the whole notebook fits, scroll to the top and capture it.

    Cells outside the viewport are not laid out (content-visibility), so the notebook's height is only an estimate
    until they are on screen: grow, let them render, measure again, until the height stops changing.
    """
    path = folder / f"{name}.png"
    measure = f"() => {{ const s = document.querySelector('{SCROLLER}'); return s ? s.scrollHeight - s.clientHeight : 0; }}"
    height = VIEWPORT["height"]
    for _ in range(5):
        wanted = min(height + page.evaluate(measure), MAX_SCREENSHOT_HEIGHT)
        if wanted == height:
            break
        height = wanted
        page.set_viewport_size({"width": VIEWPORT["width"], "height": height})
        page.evaluate(f"() => {{ const s = document.querySelector('{SCROLLER}'); if (s) s.scrollTop = 0; }}")
        page.wait_for_timeout(1000)  # cells that were off screen render now
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size(VIEWPORT)
    print(f"\nscreenshot of {name}: {path}")
    return path


def kernel_command_line(lab, notebook_path: str) -> list[str]:
    """The command line of the kernel process the server started for this notebook's session."""
    sessions = [s for s in lab.api("/api/sessions") if s["path"] == notebook_path]
    assert len(sessions) == 1, f"expected one session for {notebook_path}, the server has {lab.api('/api/sessions')}"
    kernel_id = sessions[0]["kernel"]["id"]
    pids = lab.processes_naming(f"kernel-{kernel_id}.json")
    assert len(pids) == 1, f"expected one process for kernel {kernel_id}, found {pids}"
    return Path(f"/proc/{pids[0]}/cmdline").read_bytes().decode().split("\0")[:-1]


def test_kernelspec_python3_is_the_venv_python(lab):
    specs = lab.api("/api/kernelspecs")
    assert "python3" in specs["kernelspecs"], (
        f"the server offers kernels {sorted(specs['kernelspecs'])}, not python3, which every chapter names: "
        "is ipykernel installed in .venv (`make setup`)?")
    assert specs["default"] == "python3"
    spec = specs["kernelspecs"]["python3"]["spec"]
    for name, _ in CHAPTERS:
        wanted = stored_notebook(lab, name)["metadata"]["kernelspec"]
        assert (wanted["name"], wanted["display_name"]) == ("python3", spec["display_name"]), (
            f"chapters/{name}.ipynb asks for kernel {wanted}, the server offers python3 as {spec['display_name']!r}:"
            " JupyterLab would open a 'Select Kernel' dialog; regenerate it with `make notebooks`")
    # ipykernel's own spec says "python"; jupyter_client replaces a bare python with the server's sys.executable.
    # So the kernel is the .venv's Python exactly when the server is, or when the spec names the .venv's Python.
    argv0 = spec["argv"][0]
    if argv0 in ("python", "python3"):
        server_python = Path(f"/proc/{lab.process.pid}/cmdline").read_bytes().decode().split("\0")[0]
        assert lab.is_venv_python(server_python), (
            f"the server runs on {server_python}, so kernel python3 would too; `make lab` must start .venv/bin/jupyter")
    else:
        assert lab.is_venv_python(argv0), f"kernel python3 runs {argv0}, not a Python from {lab.venv_bin}"


def test_lab_page_loads_the_widgets_extension(lab):
    """ipywidgets' JupyterLab extension must reach the page, or a learner's own `tqdm.auto` bar shows as text
    "IProgress not found" instead of a widget (the chapters use a plain text bar and do not depend on it)."""
    page = lab.get("/lab")
    config = json.loads(re.search(r'<script id="jupyter-config-data" type="application/json">(.*?)</script>',
                                  page, re.DOTALL).group(1))
    loaded = sorted(ext["name"] for ext in config["federated_extensions"])
    assert "@jupyter-widgets/jupyterlab-manager" in loaded, (
        f"JupyterLab loads {loaded} but not ipywidgets' manager: is ipywidgets installed in .venv (`make setup`)?")


@pytest.mark.parametrize("name, min_figures", CHAPTERS)
def test_chapter_runs_all_cells_in_the_browser(lab, browser, screenshots_dir, name, min_figures):
    stored = stored_notebook(lab, name)
    display_name = stored["metadata"]["kernelspec"]["display_name"]
    notebook_path = f"chapters/{name}.ipynb"
    copy_before = (lab.root / notebook_path).read_bytes()

    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page_errors, console_errors = [], []
    page.on("pageerror", lambda err: page_errors.append(str(err)))
    page.on("console", lambda msg: console_errors.append(msg.text) if msg.type == "error" else None)
    try:
        page.goto(f"{lab.url}/lab/tree/{notebook_path}?token={lab.token}")
        page.wait_for_selector(".jp-NotebookPanel .jp-Notebook", timeout=KERNEL_READY_TIMEOUT_MS)
        page.wait_for_function(KERNEL_IS_JS, arg=[display_name, "Idle"], timeout=KERNEL_READY_TIMEOUT_MS,
                               polling=250)
        assert not open_dialogs(page), f"a dialog blocks the notebook right after opening it: {open_dialogs(page)}"

        kernel_argv = kernel_command_line(lab, notebook_path)
        assert lab.is_venv_python(kernel_argv[0]), (
            f"the kernel for {notebook_path} runs {kernel_argv[0]}, not a Python from {lab.venv_bin}")

        try:
            page.evaluate(WATCH_RUN_START_JS)
            click_menu(page, "Run", "Run All Cells")
            page.wait_for_function(RUN_ALL_FINISHED_JS, arg=display_name, timeout=RUN_ALL_TIMEOUT_MS, polling=500)
        finally:
            save_screenshot(page, screenshots_dir, name)  # also when the run failed: the picture shows where

        assert not open_dialogs(page), f"a dialog appeared while the cells ran: {open_dialogs(page)}"
        check_outputs(name, page.evaluate(READ_CELLS_JS), stored, min_figures)
        assert not page_errors, f"JupyterLab's page raised in the browser (an extension failing?): {page_errors}"
        assert not console_errors, f"the browser console logged errors (an extension failing?): {console_errors}"

        close_without_saving(page)
        assert not [s for s in lab.api("/api/sessions") if s["path"] == notebook_path], (
            "closing the notebook from the File menu left its kernel running")
        assert (lab.root / notebook_path).read_bytes() == copy_before, (
            f"{notebook_path} changed on disk although it was closed without saving (autosave?)")
    finally:
        context.close()
        lab.shut_down_sessions(notebook_path)


def check_outputs(name: str, cells: list[dict], stored: dict, min_figures: int) -> None:
    """Compare what the browser shows after Run All with what the notebook stores (what nbval checks)."""
    stored_code_cells = [c for c in stored["cells"] if c["cell_type"] == "code"]
    assert len(cells) == len(stored_code_cells), (
        f"the browser shows {len(cells)} code cells, chapters/{name}.ipynb has {len(stored_code_cells)}")

    def where(cell):
        return f"{name} cell {cell['prompt']} (first line {cell['source']!r})"

    outputs = [(cell, out) for cell in cells for out in cell["outputs"]]
    for cell, out in outputs:
        assert "Traceback (most recent call last)" not in out["text"], f"{where(cell)} raised:\n{out['text']}"
        assert "\r" not in out["text"] and "\x1b" not in out["text"], (
            f"{where(cell)} shows raw control characters: {out['text']!r}")

    stderr = [(cell, out["text"].strip()) for cell, out in outputs if out["mime"] == "application/vnd.jupyter.stderr"]
    for cell, text in stderr:
        assert all(FINISHED_BAR.match(line) for line in text.splitlines()), (
            f"{where(cell)} shows this on stderr (a red box in JupyterLab):\n{text}\n"
            "Only finished progress bars belong there: fix the error, or silence a machine-dependent warning in "
            "minillm.notebook.setup().")

    prompts = [cell["prompt"] for cell in cells]
    assert prompts == [f"[{n}]:" for n in range(1, len(cells) + 1)], (
        f"Run All should execute every cell once, top to bottom, in one kernel; the prompts read {prompts}")

    # A bar redraws itself with \r; JupyterLab must leave one finished line per bar, as in the stored notebook.
    shown_bars = [line for _, out in outputs for line in out["text"].splitlines() if BAR_LIKE.search(line)]
    stored_bars = [line for text in stored_streams(stored, "stdout") + stored_streams(stored, "stderr")
                   for line in text.splitlines() if BAR_LIKE.search(line)]
    assert all(FINISHED_BAR.match(line) for line in shown_bars), f"{name}: unfinished or garbled bars: {shown_bars}"
    assert shown_bars == stored_bars, f"{name}: progress bars in the browser {shown_bars}, stored {stored_bars}"

    stdout = "".join(out["text"] for _, out in outputs if out["mime"] == "application/vnd.jupyter.stdout")
    shown = EXERCISE_STATUS.findall(stdout)
    expected = EXERCISE_STATUS.findall("".join(stored_streams(stored, "stdout")))
    assert expected, f"chapters/{name}.ipynb stores no exercise status line; the course contract asks for 2-5 exercises"
    assert shown == expected, f"exercise status lines in the browser:\n{shown}\nstored in the notebook:\n{expected}"
    assert all("not attempted yet" in line for line in shown), (
        f"{name}: a chapter's stubs are untouched, so every check must print 'not attempted yet': {shown}")

    images = [img for _, out in outputs for img in out["images"]]
    assert len(images) == stored_image_count(stored) >= min_figures, (
        f"{name}: the browser shows {len(images)} images, the notebook stores {stored_image_count(stored)} figures,"
        f" and this chapter must draw at least {min_figures}")
    assert all(img["complete"] and img["width"] > 0 for img in images), f"an image did not load: {images}"

    if DOCTOR_START.search("".join(stored_streams(stored, "stdout"))):
        check_doctor_table(name, stdout)


def check_doctor_table(name: str, stdout: str) -> None:
    """`doctor.main()` in a cell prints one aligned [OK]/[FAIL] line per component and a summary."""
    start = DOCTOR_START.search(stdout)
    assert start, f"{name}: the notebook stores the doctor's table, but the browser does not show it"
    lines = stdout[start.start():].splitlines()
    table = lines[: next(i for i, line in enumerate(lines) if DOCTOR_SUMMARY.match(line)) + 1]
    rows, summary = table[:-1], DOCTOR_SUMMARY.match(table[-1])
    assert summary["failed"] == "0", f"{name}: the doctor reports failures in JupyterLab's kernel:\n" + "\n".join(table)
    assert all(DOCTOR_LINE.match(row) for row in rows), f"{name}: unreadable doctor lines:\n" + "\n".join(rows)
    name_widths = {len(DOCTOR_LINE.match(row).group(2)) for row in rows}
    assert len(name_widths) == 1, f"{name}: the doctor's columns are not aligned:\n" + "\n".join(rows)


def close_without_saving(page) -> None:
    """File > Close and Shut Down Notebook, answering its dialogs: yes, shut down; discard the changes if asked.

    JupyterLab 4.6 asks only "Shut down the notebook?" and then drops the unsaved outputs; a "Save your work"
    dialog, should a version ask, is answered with Discard.
    """
    click_menu(page, "File", "Close and Shut Down Notebook…")
    panel, dialog = page.locator(".jp-NotebookPanel"), page.locator(".jp-Dialog")
    for _ in range(120):  # 30 s
        if not panel.count():
            break
        if dialog.count():
            buttons = dialog.locator(".jp-Dialog-button")
            labels = [label.strip() for label in buttons.all_text_contents()]
            choice = next((label for label in ("Discard", "Ok", "OK", "Shut Down") if label in labels), None)
            assert choice, f"unexpected dialog while closing: {dialog.text_content()!r} with buttons {labels}"
            buttons.filter(has_text=re.compile(rf"^{choice}$")).click()
            dialog.wait_for(state="detached", timeout=10_000)
        page.wait_for_timeout(250)
    else:
        raise AssertionError("the notebook was still open 30 s after File > Close and Shut Down Notebook")
    page.wait_for_timeout(1000)  # the kernel shutdown request reaches the server


LOG_PROBLEM = re.compile(r"^\[[EC] |Traceback|extension.*(fail|error|could not|not found|invalid)|"
                         r"(fail|error).*extension", re.IGNORECASE | re.MULTILINE)


def test_server_log_has_no_extension_errors(lab):
    """Runs last in this file, so it also sees what the notebooks' runs logged."""
    log = lab.log()
    assert "jupyterlab | extension was successfully loaded" in log, f"JupyterLab did not load:\n{log}"
    problems = [line for line in log.splitlines() if LOG_PROBLEM.search(line)]
    assert not problems, "the server logged errors:\n" + "\n".join(problems) + f"\n(full log: {lab.log_path})"
