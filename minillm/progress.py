"""Progress bars that read well in a terminal, in JupyterLab and in a notebook stored on disk.

The bar omits elapsed time and rate on purpose: those change on every run, and a stored notebook output must
not (chapter 00 explains why outputs are checked by nbval). It writes to stdout because JupyterLab paints
stderr pink, and a finished progress bar is not an error.
"""

import sys

from tqdm import tqdm

BAR_FORMAT = "{l_bar}{bar:20}| {n_fmt}/{total_fmt}"


def progress(iterable=None, total: int | None = None, desc: str | None = None, **kwargs) -> tqdm:
    """A text tqdm bar with a run-independent format; pass `disable=True` to silence it."""
    kwargs.setdefault("file", sys.stdout)
    return tqdm(iterable, total=total, desc=desc, bar_format=BAR_FORMAT, **kwargs)
