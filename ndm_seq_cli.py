"""Entry point of the ``ndm-seq`` console script, outside the ``ndm_seq`` package.

``import ndm_seq`` registers the model with transformers' Auto classes, which loads
torch and transformers (seconds). This module is imported first by the console
script; its flag tells ``ndm_seq/__init__.py`` to leave that to the subcommand
(:func:`ndm_seq.cli.main` imports ``ndm_seq.models`` once the arguments are
parsed), so that ``ndm-seq --help`` and ``ndm-seq --version`` answer at once.
``python -m ndm_seq.cli`` runs the same commands, loading everything up front.
"""

import sys

DEFER_REGISTRATION = True
"""Read by ``ndm_seq/__init__.py``: the Auto classes are registered when a subcommand runs."""


def main() -> int:
    """Run ``ndm-seq`` with the command line; returns the exit status."""
    from ndm_seq.cli import main as run

    return run(sys.argv[1:])
