import os
import random
from pathlib import Path

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


TINY_WORDS = "i you we like tea coffee the park rain sun today why not yes no maybe go home".split()
"""The vocabulary of :func:`tiny_ndm_gru`'s tokenizer corpus (tests draw contexts from it)."""


@pytest.fixture(scope="session")
def tiny_ndm_gru(tmp_path_factory) -> Path:
    """An untrained tiny GRU NDM model folder (seed 0) with a 300-piece tokenizer.

    Shared by the tests that run the CLI or sessions on a saved model; they copy it
    before editing it.
    """
    import ndm_seq

    rng = random.Random(0)
    lines = [" ".join(rng.choices(TINY_WORDS, k=rng.randint(2, 9))) + "." for _ in range(400)]
    tok = ndm_seq.NDMTokenizer.train(lines, vocab_size=300, num_threads=1)
    torch.manual_seed(0)
    config = ndm_seq.NDMConfig.preset("tiny", variant="ndm", backbone="gru", vocab_size=len(tok))
    path = tmp_path_factory.mktemp("model") / "ndm-gru"
    ndm_seq.NDMForConversation(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path
