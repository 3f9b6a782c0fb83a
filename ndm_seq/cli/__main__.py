"""`python -m ndm_seq.cli`: the same as the `ndm-seq` console script."""

import sys

from ndm_seq.cli import main

sys.exit(main())
