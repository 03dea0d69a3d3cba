"""Progress bars: widgets in JupyterLab, text where a terminal shows them.

``tqdm.auto`` draws an ipywidgets bar in a notebook and text elsewhere. The runner executes the notebooks with
``SEDIR_TEXT_PROGRESS=1`` in their environment: their output goes to its terminal, where a widget shows nothing.
"""

from __future__ import annotations

import os

TEXT_PROGRESS = "SEDIR_TEXT_PROGRESS"


def bar(iterable=None, **kwargs):
    """A tqdm bar (with its rate and time left) over ``iterable``, or a manual one with ``total=``."""
    if os.environ.get(TEXT_PROGRESS):
        from tqdm.std import tqdm
    else:
        from tqdm.auto import tqdm
    return tqdm(iterable, **kwargs)
