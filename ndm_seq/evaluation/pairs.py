"""Every metric over (context, reference) pairs, in memory.

What training-time validation logs and what :func:`ndm_seq.evaluation.evaluate`
writes to ``metrics.json``: :func:`~ndm_seq.evaluation.score_model`,
:func:`~ndm_seq.evaluation.generate_samples` and the text metrics of
:mod:`ndm_seq.metrics`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ndm_seq.evaluation.inputs import DEFAULT_MAX_RESPONSE_TOKENS
from ndm_seq.evaluation.sampling import GeneratedResponses, generate_samples
from ndm_seq.evaluation.sampling_config import SamplingConfig, check_sampling
from ndm_seq.evaluation.scoring import metric_keys, score_model
from ndm_seq.metrics import (
    corpus_bleu,
    embedding_similarity,
    load_word_vectors,
    score_responses,
    tokenize,
    vmed_bleu,
)


def text_metrics(generated: GeneratedResponses, references: Sequence[str]) -> dict[str, float]:
    """The text metrics of :func:`ndm_seq.metrics.score_responses` for generated responses.

    For latent variants this is ``score_responses(generated.samples, references)``.
    For seq2seq the single-response metrics (``bleu_1``..``bleu_4``,
    ``corpus_bleu``) score the greedy responses and the multi-sample metrics
    the S temperature samples, so every model is scored on one "first"
    response and S samples.

    Args:
        generated: from :func:`generate_samples`.
        references: one reference per context.

    Returns:
        ``{key: float}`` for every key of ``TEXT_METRIC_KEYS``.
    """
    out = score_responses(generated.samples, references)
    if generated.greedy is not None:
        out.update(
            vmed_bleu([tokenize(g) for g in generated.greedy], [tokenize(r) for r in references])
        )
        out["corpus_bleu"] = corpus_bleu(generated.greedy, list(references))
    return out


def evaluate_pairs(
    model,
    tokenizer,
    contexts: Sequence[Sequence[str]],
    references: Sequence[str],
    sampling: SamplingConfig | None = None,
    *,
    batch_size: int = 32,
    max_context_tokens: int | None = None,
    max_response_tokens: int = DEFAULT_MAX_RESPONSE_TOKENS,
    word_vectors=None,
    seed: int | None = 0,
    progress: bool = False,
) -> tuple[dict[str, float | int], GeneratedResponses]:
    """Every metric of docs/design.md §5 over (context, reference) pairs, in memory.

    :func:`score_model` + :func:`generate_samples` + :func:`text_metrics`
    (+ :func:`ndm_seq.metrics.embedding_similarity` of the first responses);
    what :func:`evaluate` writes to ``metrics.json`` and what the trainer's
    validation logs.

    Args:
        model: an :class:`~ndm_seq.NDMForConversation`.
        tokenizer: its :class:`~ndm_seq.NDMTokenizer`.
        contexts: the contexts, each a list of turns.
        references: one reference response per context.
        sampling: how many responses per context and how (:class:`SamplingConfig`;
            None: its defaults; see :func:`generate_samples`).
        batch_size: contexts per forward / generate call.
        max_context_tokens: context length limit (default 128; the trainer passes
            its run's ``data.max_context_tokens``).
        max_response_tokens: reference length limit when scoring, ``</s>`` included
            (default 64; the trainer passes its run's ``data.max_response_tokens``).
        word_vectors: a :class:`ndm_seq.metrics.WordVectors` for the embedding
            metrics, or None.
        seed: RNG seed for sampling (None: current RNG state).
        progress: show tqdm bars.

    Returns:
        ``(metrics, generated)``: metrics with exactly :func:`metric_keys`
        (values are floats, ``active_units`` and ``embedding_empty_pairs``
        ints; ``self_bleu`` is nan when S = 1), and the responses.
    """
    sampling = check_sampling(sampling)
    if len(contexts) != len(references):
        raise ValueError(
            f"contexts has {len(contexts)} entries but references has {len(references)}"
        )
    scores = score_model(
        model, tokenizer, contexts, references, batch_size=batch_size,
        max_context_tokens=max_context_tokens, max_response_tokens=max_response_tokens,
        progress=progress,
    )  # fmt: skip
    generated = generate_samples(
        model, tokenizer, contexts, sampling, batch_size=batch_size,
        max_context_tokens=max_context_tokens, seed=seed, progress=progress,
    )  # fmt: skip
    merged: dict[str, float | int] = {**text_metrics(generated, references), **scores}
    if word_vectors is not None:
        merged.update(
            embedding_similarity([[f] for f in generated.first], list(references), word_vectors)
        )
    keys = metric_keys(model.config.variant, word_vectors is not None)
    return {k: merged[k] for k in keys}, generated


def _embedding_metrics(
    word_vectors: str | Path, references: Sequence[str], first: Sequence[str]
) -> dict[str, float | int]:
    """The embedding metrics of the first responses, word vectors read from a GloVe file."""
    # Loaded after generation, keeping only the words that occur (GloVe files are large).
    vocab = {t for text in [*references, *first] for t in tokenize(text)}
    wv = load_word_vectors(word_vectors, vocabulary=vocab)
    return embedding_similarity([[f] for f in first], references, wv)


def protocol_pairs(
    model,
    tokenizer,
    contexts: Sequence[Sequence[str]],
    references: Sequence[str],
    protocol: str,
    sampling: SamplingConfig,
    *,
    word_vectors: str | Path | None = None,
    batch_size: int = 32,
    max_context_tokens: int | None = None,
    seed: int | None = 0,
    progress: bool = False,
) -> tuple[dict[str, float], GeneratedResponses]:
    """The metrics of a named protocol (:mod:`ndm_seq.metrics.protocols`) over pairs.

    Generates ``sampling.num_samples`` responses per context (the caller sets the
    protocol's count, each prior draw decoded greedily), then scores them with
    :func:`~ndm_seq.metrics.protocols.score_protocol`; word vectors, when the protocol
    needs them, are read from the GloVe file keeping the words that occur.
    """
    from ndm_seq.metrics.protocols import PROTOCOLS, score_protocol

    proto = PROTOCOLS[protocol]
    generated = generate_samples(
        model, tokenizer, contexts, sampling, batch_size=batch_size,
        max_context_tokens=max_context_tokens, seed=seed, progress=progress,
    )  # fmt: skip
    vectors = None
    if proto.needs_embeddings:
        texts = [*references, *generated.first, *(s for c in generated.samples for s in c)]
        vocab = {t for text in texts for t in proto.tokenize(text)}
        vectors = load_word_vectors(word_vectors, vocabulary=vocab)
    metrics = score_protocol(protocol, generated.samples, generated.first, references, vectors)
    return metrics, generated
