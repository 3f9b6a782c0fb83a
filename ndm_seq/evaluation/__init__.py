"""Evaluation of trained models (docs/design.md §5): model-side scores, sampled responses, reports.

One package, used by ``ndm-seq evaluate`` / ``sample`` / ``chat`` and by the
trainer's validation, so every number means the same thing everywhere. Every
name below is importable from ``ndm_seq.evaluation``; the module that holds it
is in brackets.

* :func:`score_model` — teacher-forced numbers over (context, response) pairs:
  NLL, KL, the perplexity bound, active units, NDM diagnostics (``scoring``,
  with :func:`metric_keys`).
* :func:`generate_samples` — S responses per context (latent variants: one
  prior draw per response; seq2seq: greedy plus S temperature samples)
  (``sampling``, with :func:`stream_samples`).
* :func:`evaluate_pairs` — both of the above plus the text metrics of
  :func:`ndm_seq.metrics.score_responses`: the whole ``metrics.json`` in memory
  (what training-time validation calls) (``pairs``).
* :func:`evaluate` — loads a model directory and a prepared dataset, and writes
  ``metrics.json``, ``samples.jsonl`` and ``results.md`` (this file; loading in
  ``loading``, the files in ``reports``).
* :func:`comparison_table` / :func:`comparison_chart` — several runs side by
  side (Markdown table, bar-chart PNG), for the recipes' compare step (``reports``).
* :class:`ChatSession` — a bounded-history dialogue with a model, used by
  ``ndm-seq chat`` and drivable from code (``chat``).
* :class:`SamplingConfig` — how many responses per context and how (temperature,
  top-p, top-k, greedy, longest response), passed whole to all of the above
  (``sampling_config``).
* :func:`scoring_limits` — the context and response token limits of a model's run
  config, which :func:`evaluate` scores with unless given (``limits``).
* :func:`check_text` and the length limits shared by all of them (``inputs``).

Definitions (per response = per (context, reference) pair, natural logs):

================  ==========================================================================
key               definition
================  ==========================================================================
``nll``           ``-log p(x | z, c)`` summed over the response's tokens (``</s>``
                  included), mean over responses. Latent variants score with ``z`` the
                  posterior mean ``E[q(z|c,x)]`` (the model in eval mode; VMED: the
                  per-step posterior means); seq2seq has no latent.
``kl``            ``KL(q(z|c,x) || p(z|c))`` per response, closed form (cvae, ndm); VMED's
                  mixture approximation summed over steps (vmed); 0 for seq2seq (no latent).
``ppl``           ``exp((sum NLL + sum KL) / number of target tokens)``: the ELBO turned
                  into a per-token perplexity, an upper bound on the true perplexity for
                  cvae/ndm up to the one-point (posterior-mean) estimate of the
                  reconstruction term. The KL belongs in it: the reconstruction NLL alone
                  lets the posterior see the response, which seq2seq cannot. For vmed the
                  KL is an approximation, so its value is not a guaranteed bound; for
                  seq2seq it is the exact perplexity.
``active_units``  ``#{d : Var_x(E_q[z_d]) > 0.01}`` over the scored responses
                  (:func:`ndm_seq.metrics.active_units`); 0 for seq2seq.
``context_gain``  how much the model uses the context: ``NLL + KL`` per response with
                  the context of another pair (pair ``(i + P/2) mod P``, never its own)
                  minus ``NLL + KL`` with its own context, mean over responses, nats.
                  0 for a model that ignores the context; ``nan`` for a single pair.
``prior_nll``     ``-log p(x | z, c)`` per response with ``z`` drawn from the prior
                  ``p(z|c)`` instead of the posterior (vmed: every step's ``z_t`` from its
                  prior mixture), mean over responses; the draws are seeded. Far above
                  ``nll``: the latent carries what the prior cannot give (prior samples
                  will not read like the responses). ``nll`` for seq2seq.
``kl_per_step``   ``sum KL / number of target tokens``: for vmed the mean KL of one
                  step's latent; for cvae/ndm the response's KL spread over its tokens.
``latent_recon_`` ndm only: ``||z - z'||_2`` (Euclidean norm, *not* squared; the training
``error``         objective uses the square) between the posterior mean ``z`` and its
                  composition ``z'``, mean over responses.
``slot_weight_``  ndm only: with ``w`` the ``N`` least-squares weights composing ``z'`` (the
``entropy``       last read) and ``p_n = |w_n| / sum_m |w_m|``, ``H = -sum_n p_n ln p_n``
                  (``0 ln 0 = 0``; an all-zero ``w`` counts as uniform, ``ln N``), mean over
                  responses. In ``[0, ln N]``: 0 when one slot carries ``z'``, ``ln N`` when
                  all slots weigh the same.
================  ==========================================================================

Text metrics (``bleu_*``, ``distinct_*``, ...) are defined in
:mod:`ndm_seq.metrics`; the "first" response they score is the first latent
draw for latent variants and the greedy response for seq2seq, and the
multi-sample metrics use the S samples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ndm_seq import folders
from ndm_seq.evaluation.chat import (
    CHAT_HELP,  # noqa: F401 (public, not in __all__)
    ChatSession,
    chat_loop,
    one_line,
)
from ndm_seq.evaluation.inputs import (
    DEFAULT_MAX_CONTEXT_TOKENS,  # noqa: F401 (public, not in __all__)
    DEFAULT_MAX_NEW_TOKENS,  # noqa: F401 (public, not in __all__)
    DEFAULT_MAX_RESPONSE_TOKENS,  # noqa: F401 (public, not in __all__)
    check_text,
)
from ndm_seq.evaluation.limits import ScoringLimits, default_output, scoring_limits
from ndm_seq.evaluation.loading import (
    MODEL_FILES,  # noqa: F401 (public, not in __all__)
    TOKENIZER_FILES,  # noqa: F401 (public, not in __all__)
    _load_split,
    _select,
    load_model,
)
from ndm_seq.evaluation.pairs import (
    _embedding_metrics,
    evaluate_pairs,
    protocol_pairs,
    text_metrics,  # noqa: F401 (public, not in __all__)
)
from ndm_seq.evaluation.reports import (
    CHART_PANELS,  # noqa: F401 (public, not in __all__)
    EVALUATION_FILES,  # noqa: F401 (public, not in __all__)
    MAIN_COLUMNS,
    _earlier_evaluation,
    _results_header,
    _write_metrics,
    _write_samples,
    comparison_chart,
    comparison_table,
    finite_or_none,
    read_metrics,
)
from ndm_seq.evaluation.sampling import GeneratedResponses, generate_samples, stream_samples
from ndm_seq.evaluation.sampling_config import SamplingConfig, SamplingConfigError, check_sampling
from ndm_seq.evaluation.scoring import (
    EMBEDDING_METRIC_KEYS,
    MODEL_METRIC_KEYS,
    NDM_METRIC_KEYS,
    metric_keys,
    score_model,
    slot_weight_entropy,
)
from ndm_seq.evaluation.settings import (
    SETTINGS_KEY,
    evaluation_settings,
    metric_values,
    settings_of,
)
from ndm_seq.metrics.glove import GLOVE_6B_50D, GLOVE_6B_URL, resolve_embeddings
from ndm_seq.metrics.protocols import NORMALIZATION, PROTOCOLS

__all__ = [
    "EMBEDDING_METRIC_KEYS",
    "MAIN_COLUMNS",
    "MODEL_METRIC_KEYS",
    "NDM_METRIC_KEYS",
    "ChatSession",
    "GeneratedResponses",
    "SamplingConfig",
    "SamplingConfigError",
    "ScoringLimits",
    "chat_loop",
    "check_text",
    "comparison_chart",
    "comparison_table",
    "evaluate",
    "evaluate_pairs",
    "generate_samples",
    "load_model",
    "metric_keys",
    "metric_values",
    "one_line",
    "read_metrics",
    "score_model",
    "scoring_limits",
    "settings_of",
    "slot_weight_entropy",
    "stream_samples",
]


def evaluate(
    model_dir: str | Path,
    data_dir: str | Path,
    split: str = "test",
    sampling: SamplingConfig | None = None,
    max_contexts: int | None = None,
    output_dir: str | Path | None = None,
    word_vectors: str | Path | None = None,
    seed: int = 0,
    *,
    batch_size: int = 32,
    max_context_tokens: int | None = None,
    max_response_tokens: int | None = None,
    run_config=None,
    device: str | None = None,
    name: str | None = None,
    progress: bool = True,
    protocol: str = "full",
) -> dict[str, Any]:
    """Evaluate a model directory on a prepared split and write the reports.

    Writes into ``output_dir`` (default: ``RUN/eval-SPLIT`` beside a run's ``model/``, else
    ``MODEL_DIR/eval-SPLIT``; :func:`~ndm_seq.evaluation.limits.default_output`):

    * ``metrics.json``: the flat keys of :func:`metric_keys` (docs/design.md §7), or of
      the protocol (:data:`ndm_seq.metrics.protocols.PROTOCOLS`), plus one key
      ``settings`` with every setting that changes a number
      (:func:`~ndm_seq.evaluation.settings.evaluation_settings`); a value that is not
      finite (``self_bleu`` with one sample) is ``null``;
    * ``samples.jsonl``: one object per context, ``{"context": [...],
      "reference": str, "samples": [S strings]}`` (seq2seq adds ``"greedy"``);
    * ``results.md``: the metrics as a one-row Markdown table
      (:func:`comparison_table` with every key), with the settings above it (the
      sampling, and the token limits and where they came from).

    The token limits are those the model was trained with: each one not given is the
    ``data`` section's of the run config (``run_config``, by default the ``config.yaml``
    of the run folder holding ``model_dir``: :func:`~ndm_seq.evaluation.limits.scoring_limits`);
    a bare model folder, with no run config, is scored with the defaults (128 context,
    64 response tokens). Deterministic given ``seed`` (and the same device and batch size).

    Args:
        model_dir: directory with the model and tokenizer (:func:`load_model`).
        data_dir: a prepared dataset (``ndm-seq prepare``), split columns
            ``context`` (list of str) and ``response`` (str).
        split: the split to evaluate.
        sampling: responses per context and how (:class:`SamplingConfig`; None: its
            defaults, S = 10 as in docs/design.md §5, each latent draw decoded greedily).
        max_contexts: evaluate a subset of this many contexts, drawn with
            ``seed`` and kept in split order (None: all).
        output_dir: where to write: a new or empty folder (created and marked as
            ``ndm-seq evaluate``'s, :mod:`ndm_seq.folders`) or one evaluate wrote before;
            any other folder is refused before anything is generated.
        word_vectors: a GloVe-format file, or an ``http(s)`` URL of one (downloaded once,
            :func:`~ndm_seq.metrics.glove.resolve_embeddings`), for the embedding metrics;
            required by the ``vmed`` and ``kgcvae`` protocols.
        seed: seed for the subset and for sampling.
        batch_size: contexts per forward / generate call.
        max_context_tokens: context length limit (None: the run config's, else 128).
        max_response_tokens: reference length limit when scoring, ``</s>`` included
            (None: the run config's, else 64).
        run_config: where the limits not given come from: a
            :class:`~ndm_seq.training.RunConfig` or a YAML run config's path (None: the
            run folder's ``config.yaml``, if ``model_dir`` is in one).
        device: torch device (default: cuda if available, else cpu).
        name: row name in ``results.md`` (default: ``VARIANT-BACKBONE``, e.g. ``ndm-gru``).
        progress: show tqdm bars.
        protocol: ``"full"`` (every metric of docs/design.md §5), or ``"vmed"``,
            ``"kgcvae"``, ``"plato"``: score as that anchor's code does
            (:mod:`ndm_seq.metrics.protocols`, docs/metrics.md); the protocol fixes the
            number of responses per context and decodes each prior draw greedily,
            the rest of ``sampling`` still applies.

    Returns:
        The metrics as written to ``metrics.json`` (``settings`` included;
        :func:`metric_values` drops it).

    Raises:
        FileNotFoundError: missing model files or data directory.
        KeyError: the dataset has no such split.
        ValueError: bad arguments, an empty split, a run config that cannot be read, an
            unknown protocol, a protocol that needs word vectors without them.
        OSError: word vectors given as a URL that cannot be downloaded.
        ndm_seq.folders.FolderError: ``output_dir`` is a file, a user's folder or another
            command's output (a ``ValueError``); ``FolderBusy`` while another launch
            writes it.
    """
    sampling = check_sampling(sampling)
    if max_contexts is not None and max_contexts < 1:
        raise ValueError(f"max_contexts must be >= 1, got {max_contexts}")
    proto = _protocol(protocol, word_vectors)
    if proto is not None:  # the protocol fixes the count and decodes each draw greedily
        sampling = sampling.replace(num_samples=proto.num_samples, greedy=True)
        if not proto.needs_embeddings:
            word_vectors = None  # no embedding metric in it: nothing to read or download
    if word_vectors is not None:  # a URL is downloaded (once) before the model loads
        word_vectors = resolve_embeddings(word_vectors)
    limits = scoring_limits(model_dir, max_context_tokens, max_response_tokens, run_config)
    ds = _load_split(data_dir, split)  # before the model: a wrong split fails fast
    model, tokenizer = load_model(model_dir, device, progress)
    out = Path(output_dir) if output_dir is not None else default_output(model_dir, f"eval-{split}")
    # Refused before the (long) generation if the folder is a user's or another command's.
    folders.claim(out, "evaluate", adopt=_earlier_evaluation)
    with folders.exclusive(out, "evaluate"):
        contexts, references = _select(ds, max_contexts, seed)
        common = dict(
            batch_size=batch_size, max_context_tokens=limits.max_context_tokens, seed=seed,
            progress=progress,
        )  # fmt: skip
        if proto is None:
            metrics, generated = evaluate_pairs(
                model, tokenizer, contexts, references, sampling,
                max_response_tokens=limits.max_response_tokens, **common,
            )  # fmt: skip
            if word_vectors is not None:
                metrics.update(_embedding_metrics(word_vectors, references, generated.first))
        else:
            metrics, generated = protocol_pairs(
                model, tokenizer, contexts, references, protocol, sampling,
                word_vectors=word_vectors, **common,
            )  # fmt: skip
        metrics = finite_or_none(metrics)
        cfg = model.config
        settings = evaluation_settings(
            protocol=protocol, split=split, contexts=len(contexts), split_size=len(ds),
            seed=seed, sampling=sampling, decoding=sampling.describe(cfg.is_latent),
            limits=limits, batch_size=batch_size, device=str(model.device),
            normalization=NORMALIZATION if proto is None else proto.normalization,
            word_vectors=None if word_vectors is None else str(word_vectors),
        )  # fmt: skip
        written = {**metrics, SETTINGS_KEY: settings}
        _write_metrics(out / "metrics.json", written)
        _write_samples(out / "samples.jsonl", contexts, references, generated)
        label = name or f"{cfg.variant}-{cfg.backbone}"
        header = _results_header(label, model_dir, data_dir, cfg, settings, generated)
        table = comparison_table({label: metrics}, columns=list(metrics))
        (out / "results.md").write_text(header + table)
        _add_to_card(model_dir, split, label, header, metrics, out)
        return written


def _add_to_card(model_dir, split: str, label: str, header: str, metrics, out: Path) -> None:
    """The test table in the model card, when the model folder has ndm-seq's card
    (:func:`ndm_seq.model_card.add_evaluation`; an evaluation of the same split replaces it)."""
    from ndm_seq.model_card import add_evaluation

    details = header.split("\n\n", 1)[1].strip()  # the header's list, without its title
    columns = [c for c in MAIN_COLUMNS if c in metrics] or list(metrics)
    body = (
        f"## Evaluation: split `{split}` (`ndm-seq evaluate`)\n\n{details}\n"
        f"- all metrics: `{out / 'metrics.json'}`, `{out / 'results.md'}`\n\n"
        + comparison_table({label: metrics}, columns=columns)
    )
    add_evaluation(model_dir, split, body)


def _protocol(protocol: str, word_vectors):
    """The :class:`~ndm_seq.metrics.protocols.Protocol` named (None for ``full``), checked."""
    if protocol == "full":
        return None
    if protocol not in PROTOCOLS:
        raise ValueError(
            f"unknown protocol {protocol!r}; choose one of full, {', '.join(PROTOCOLS)}"
        )
    proto = PROTOCOLS[protocol]
    if proto.needs_embeddings and word_vectors is None:
        raise ValueError(
            f"protocol {protocol!r} needs word vectors: pass a GloVe text file or URL "
            f"(--embeddings; VMED used {GLOVE_6B_50D} from {GLOVE_6B_URL})"
        )
    return proto
