"""Progress bars must not print anything that changes from run to run (a stored notebook would differ)."""

import io
import re

from minillm.progress import progress


def test_bar_shows_counts_but_no_time_or_rate():
    out = io.StringIO()
    for _ in progress(range(30), desc="train", file=out, mininterval=0):
        pass
    text = out.getvalue()
    assert "30/30" in text and "train" in text
    assert not re.search(r"\d+:\d+|it/s|s/it", text), f"volatile timing in the bar: {text!r}"
