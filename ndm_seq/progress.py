"""Progress bars of the libraries ndm-seq drives, on or off for one command.

``datasets`` (``map``), ``transformers`` ("Loading weights", "Writing model shards")
and ``huggingface_hub`` each keep a global switch. :func:`library_progress_bars`
turns them off for a ``with`` block through their public functions and restores each
to what it was afterwards; ``enabled=True`` changes nothing. The environment variables
of those libraries (``HF_DATASETS_DISABLE_PROGRESS_BARS``, ...) keep priority.

Nothing is imported at module level: the CLI imports this module before it knows
whether torch is needed.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def library_progress_bars(enabled: bool) -> Iterator[None]:
    """Within the block, no progress bars from datasets, transformers, huggingface_hub
    unless ``enabled``."""
    if enabled:
        yield
        return
    import datasets.utils
    import huggingface_hub.utils as hub
    from transformers.utils import logging as hf_logging

    was = (
        hf_logging.is_progress_bar_enabled(),
        not datasets.utils.are_progress_bars_disabled(),
        not hub.are_progress_bars_disabled(),
    )
    with warnings.catch_warnings():  # an environment variable that forces them wins
        warnings.simplefilter("ignore")
        hf_logging.disable_progress_bar()  # also huggingface_hub's
        datasets.utils.disable_progress_bars()
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if was[0]:
                hf_logging.enable_progress_bar()  # also turns huggingface_hub's on
            if was[1]:
                datasets.utils.enable_progress_bars()
            if was[2]:
                hub.enable_progress_bars()
            elif not hub.are_progress_bars_disabled():
                hub.disable_progress_bars()
