import os

import pytest
import torch
from hypothesis import settings

# Property tests are derandomised by default so CI is deterministic; set
# HYPOTHESIS_PROFILE=explore to search with fresh random inputs and more examples.
settings.register_profile("default", derandomize=True, deadline=None)
settings.register_profile("explore", max_examples=2000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def _seed_and_threads():
    # Every test starts from the same RNG state, so a failure reproduces.
    torch.manual_seed(0)
    yield
