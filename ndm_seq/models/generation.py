"""A faster decoding loop for plain sampling and greedy search, plugged into ``GenerationMixin``.

``NDMForConversation.generate`` passes :func:`decode` to transformers'
``generate(..., custom_generate=<callable>)``: ``GenerationMixin`` still
validates the arguments, runs the encoder, expands the inputs for
``num_return_sequences``, builds the logits processors and stopping criteria
and the final generation config, and then hands the decoding loop to us. The
loop is ``GenerationMixin._sample``'s (same processors, same stopping, finished
rows padded with ``pad_token_id``), with three differences that do not change
what is generated:

* **sampling over the support only** (:func:`sample_tokens`): when the
  processed scores are ``-inf`` outside the ``top_k`` largest entries (the
  ``TopKLogitsWarper`` did that), the softmax and the multinomial draw run over
  those ``k`` entries instead of the whole vocabulary; the distribution is the
  same (``exp(-inf) = 0``), the random numbers drawn are not, so a seeded
  sample differs from the standard loop's while greedy search is identical;
* **a preallocated self-attention cache** (transformer): each step writes its
  keys/values at its position in buffers sized for ``max_length`` instead of
  concatenating the whole cache again (:class:`SelfAttentionBuffer`);
* **cross-attention per context, not per returned sequence**: the
  ``num_return_sequences`` rows of one context share its encoder states, so
  the cross-attention keys/values are computed once per context and the
  ``k`` samples' queries attend to them grouped as one ``(k * t)``-long query.

What it cannot reproduce exactly (beams, streamers, ``output_scores`` and the
other ``return_dict_in_generate`` outputs, assisted or chunked decoding) goes
through the standard path: see :func:`applies`.

**Compiled decoding** (``generate(..., compile="default" | "reduce-overhead" |
"max-autotune" | "aot_eager")``): every one-token step after the first runs the
model as one ``torch.compile`` graph of fixed shapes (:class:`CompiledStep`):
the self-attention buffer is static (written at a position held in a device
tensor, attended whole with the unwritten positions masked), so one graph
(one CUDA graph with ``reduce-overhead``) serves every step of every call
with the same batch size and capacity. A seeded sample differs from the
eager loop's (the compiled graph draws its own random numbers); greedy search
agrees up to float rounding.

**On an accelerator** the loop, compiled or not, reads nothing back from the
device per step: tokens are drawn by the exponential race
(:func:`draw_on_device`, the distribution of ``torch.multinomial``, which
reads its input back to check it; the CPU's top-k shortcut and its tie check
are left out) and whether every row has finished is read every
:data:`STOP_CHECK_EVERY` steps, the extra all-padding columns cut off at the
end.
"""

from __future__ import annotations

import weakref

import torch
from transformers.generation.configuration_utils import GenerationMode
from transformers.generation.logits_process import LogitsProcessorList, TopKLogitsWarper

from ndm_seq.models.state import DecoderState, SelfAttentionBuffer, clone_tensors

__all__ = [
    "COMPILE_CHOICES",
    "CompiledStep",
    "applies",
    "decode",
    "defers_reads",
    "draw_on_device",
    "sample_tokens",
    "sample_top_k",
]

COMPILE_CHOICES = ("off", "default", "reduce-overhead", "max-autotune", "aot_eager")
RECOMPILE_LIMIT = 64  # graphs of the compiled step, all models and batch sizes of a process
STOP_CHECK_EVERY = 8  # accelerators: steps between reads of "has every row finished"


def sample_tokens(scores: torch.Tensor, top_k: int | None = None) -> torch.Tensor:
    """One token per row of ``(B, V)`` processed scores, drawn from ``softmax(scores)``.

    Exactly the distribution of ``torch.multinomial(scores.softmax(-1), 1)``
    (what ``GenerationMixin._sample`` draws from). With ``top_k`` given and
    every row ``-inf`` outside its ``top_k`` largest entries (checked: the
    ``(top_k + 1)``-th largest is ``-inf``), only those entries are
    normalised and drawn from; otherwise (ties at the k-th value kept by the
    warper, no top-k warper, ``top_k >= V``) the whole row is.
    """
    vocab = scores.shape[-1]
    if top_k is not None and 0 < top_k < vocab:
        values, index = scores.topk(top_k + 1, dim=-1)
        if bool((values[:, top_k] == float("-inf")).all()):
            return _draw(values[:, :top_k], index)
    return torch.multinomial(scores.softmax(-1), num_samples=1).squeeze(1)


def sample_top_k(scores: torch.Tensor, top_k: int) -> torch.Tensor | None:
    """:func:`sample_tokens` of ``TopKLogitsWarper(top_k)(scores)`` without building that row.

    The warper keeps every entry ``>=`` the k-th largest (ties included) and
    sets the rest to ``-inf``; when no row has a tie at the k-th value (the
    ``(k + 1)``-th largest is smaller, or the k-th is already ``-inf``) its
    support is exactly the ``top_k`` largest entries, and they are drawn from
    directly. Returns ``None`` when some row has such a tie (the caller then
    applies the warper).
    """
    vocab = scores.shape[-1]
    if not 0 < top_k < vocab:
        return None
    values, index = scores.topk(top_k + 1, dim=-1)
    kth, next_ = values[:, top_k - 1], values[:, top_k]
    if not bool(((next_ < kth) | (kth == float("-inf"))).all()):
        return None
    return _draw(values[:, :top_k], index)


def _draw(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    pick = torch.multinomial(values.softmax(-1), num_samples=1)
    return index.gather(1, pick).squeeze(1)


def _trailing_top_k(logits_processor):
    """``(other processors, k)`` when the last processor is a ``-inf`` top-k warper, else ``None``."""
    if not logits_processor:
        return None
    last = logits_processor[-1]
    if type(last) is not TopKLogitsWarper or last.filter_value != float("-inf"):
        return None
    return LogitsProcessorList(logits_processor[:-1]), last.top_k


def draw_on_device(scores: torch.Tensor) -> torch.Tensor:
    """One token per row of ``(B, V)`` scores from ``softmax(scores)``, without a host read.

    The exponential race ``argmax(p / E)``, ``E ~ Exp(1)`` (what
    ``torch.multinomial`` computes for one sample after checking its input on
    the host); entries at ``-inf`` have ``p = 0`` and are never drawn.
    """
    probs = scores.softmax(-1)
    return (probs / torch.empty_like(probs).exponential_()).argmax(-1)


def _step_forward(model, ids, enc, inputs: dict, state: DecoderState):
    out = model(decoder_input_ids=ids, encoder_outputs=enc, cache=state, **inputs)
    return out.logits[:, -1].float(), out.cache.latent, out.cache.hidden


class CompiledStep:
    """A one-token decoding step as one ``torch.compile`` graph of fixed shapes.

    Called with the model, the step's ``(B, 1)`` ids, the encoder output, the
    model's extra inputs and a :class:`DecoderState` whose
    :attr:`~DecoderState.static_step` holds; returns the ``(B, V)`` float32
    logits and the next latent and hidden states (the keys/values go into the
    static buffer in place). Shapes never change from step to step, so
    ``dynamic=False``: a new batch size or buffer capacity compiles once more.
    ``choice`` is one of :data:`COMPILE_CHOICES` other than ``off``. One per
    model and choice (:meth:`of`, held beside the model, not in it, so that a
    copy of the model gets its own), so that later ``generate`` calls reuse the
    compiled code and the static buffers.
    """

    def __init__(self, choice: str):
        if choice not in COMPILE_CHOICES[1:]:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_CHOICES)}; got {choice!r}")
        options = {"backend": "aot_eager"} if choice == "aot_eager" else {"mode": choice}
        self.graphs = choice == "reduce-overhead"  # CUDA graphs on a GPU
        self.fn = torch.compile(_step_forward, dynamic=False, **options)
        self.buffers: dict = {}  # the static self-attention buffers, reused call after call

    def __call__(self, model, ids, enc, inputs: dict, state: DecoderState) -> tuple:
        # One graph per model, batch size and capacity: more than dynamo's default of 8 per
        # function when one process samples from several models. allow_rnn: dynamo wraps
        # the nn.GRU modules (their one-token steps are run_gru's ops).
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT, allow_rnn=True):
            if self.graphs:
                torch.compiler.cudagraph_mark_step_begin()
            logits, latent, hidden = self.fn(model, ids, enc, inputs, state)
        if self.graphs:  # the next replay overwrites a graph's outputs: copy the carried ones
            latent, hidden = clone_tensors(latent), clone_tensors(hidden)
        return logits, latent, hidden

    @staticmethod
    def of(model, choice: str) -> CompiledStep:
        """The compiled step of ``model`` for ``choice`` (made on first use)."""
        steps = _COMPILED_STEPS.setdefault(model, {})
        if choice not in steps:
            steps[choice] = CompiledStep(choice)
        return steps[choice]


_COMPILED_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""model -> {choice: CompiledStep}; an entry goes with its model."""


def applies(model, generation_config, kwargs: dict) -> bool:
    """Whether :func:`decode` can run this ``generate`` call with the standard loop's outputs.

    ``generation_config`` is the resolved config (call arguments over the
    model's defaults); ``kwargs`` the remaining ``generate`` arguments.
    """
    if any(kwargs.get(k) is not None for k in ("custom_generate", "streamer", "assistant_model")):
        return False
    if kwargs.get("synced_gpus") or model.training:  # dropout: keep the standard path's
        return False
    gc = generation_config
    mode = gc.get_generation_mode(None)
    if mode not in (GenerationMode.SAMPLE, GenerationMode.GREEDY_SEARCH):
        return False
    outputs = (gc.output_scores, gc.output_logits, gc.output_attentions, gc.output_hidden_states)
    if gc.return_dict_in_generate or any(outputs):
        return False
    return gc.prefill_chunk_size is None and not gc.is_assistant


def _pad_token(gc) -> int | None:
    """What finished rows are padded with: ``pad_token_id``, else the first ``eos_token_id`` (as ``generate``)."""
    if gc.pad_token_id is not None:
        return gc.pad_token_id
    eos = gc.eos_token_id
    return eos[0] if isinstance(eos, list) and eos else eos


def _group_size(enc, group: int) -> int:
    """``group`` if the encoder rows come in runs of ``group`` identical rows (else 1)."""
    b = enc.last_hidden_state.shape[0]
    if group <= 1 or b % group:
        return 1
    for t in (enc.encoder_mask, enc.last_hidden_state):
        first = t[::group]
        if not torch.equal(first.repeat_interleave(group, dim=0), t):
            return 1
    return group


@torch.no_grad()
def decode(
    model,
    input_ids: torch.LongTensor,
    logits_processor,
    stopping_criteria,
    generation_config,
    group: int | None = None,
    compile: str = "off",
    **model_kwargs,
) -> torch.LongTensor:
    """``GenerationMixin._sample`` for :class:`NDMForConversation`, returning the sequences.

    Called by ``GenerationMixin.generate`` as its ``custom_generate``.
    ``group``: rows per context in the (expanded) batch; defaults to
    ``num_return_sequences``. Grouping is verified (identical encoder rows)
    before the cross-attention keys/values are shared. ``compile``: one of
    :data:`COMPILE_CHOICES`; other than ``off``, the steps after the first run
    as a :class:`CompiledStep`.
    """
    gc = generation_config
    if not applies(model, gc, model_kwargs):
        raise ValueError(
            "the fast decoding loop cannot run this generate call (beams, extra outputs, ...); "
            "pass fast_generate=False"
        )
    pad = _pad_token(gc)
    has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    if has_eos and pad is None:
        raise ValueError("pad_token_id must be set when an eos_token_id stops generation")
    enc = model_kwargs["encoder_outputs"]
    group = _group_size(enc, gc.num_return_sequences if group is None else group)
    # Decoder positions: at most max_length - 1 are fed back, never more than the model covers.
    capacity = min(gc.max_length or 1 << 30, model.config.max_position_embeddings)
    compiled = None if compile == "off" else CompiledStep.of(model, compile)
    pool = None if compiled is None else compiled.buffers
    state = DecoderState(kv=SelfAttentionBuffer(capacity, compiled is not None, pool), group=group)
    inputs = {k: model_kwargs.get(k) for k in ("attention_mask", "latent", "slots", "slot_weights")}
    device = input_ids.device
    deferred = defers_reads(device)
    draw = _drawer(gc, logits_processor, deferred)
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=device)
    steps = torch.zeros((), dtype=torch.long, device=device)  # steps some row was unfinished
    if pad is not None:
        pad = torch.tensor(pad, device=device)
    start = input_ids.shape[1]
    tokens = input_ids[:, -1]  # the last draw (contiguous): a static step's input
    while True:
        if state.static_step:
            if input_ids.shape[1] > capacity:
                raise ValueError(
                    f"decoding position {input_ids.shape[1]} exceeds the buffer's {capacity} "
                    f"(max_length, max_position_embeddings={model.config.max_position_embeddings})"
                )
            logits, latent, hidden = compiled(model, tokens[:, None], enc, inputs, state)
            state = DecoderState(latent, hidden, state.layers, state.length, state.kv, group)
            state.kv.position.add_(1)
        else:
            logits, state = _eager_step(model, input_ids, enc, inputs, state)
            if compiled is not None:  # the steps after this one are static
                state.kv.position = torch.tensor([state.length], device=device)
        # The scores stay alive until the next step's draw: freed before the next model
        # call, the eager loop on CPU ran 12-16% slower (benchmarks/README.md, "Compiled
        # sampling on CPU": each step's (B, V) blocks were handed back to the OS by the C
        # allocator and faulted in again).
        tokens, _held = draw(input_ids, logits)
        if has_eos:
            tokens = tokens * unfinished + pad * (1 - unfinished)
        if deferred:
            steps += unfinished.amax()
        input_ids = torch.cat([input_ids, tokens[:, None]], dim=-1)
        unfinished = unfinished & ~stopping_criteria(input_ids, None)
        if deferred and (input_ids.shape[1] - start) % STOP_CHECK_EVERY:
            if not gc.max_length or input_ids.shape[1] < gc.max_length:
                continue
        if unfinished.max() == 0:
            return input_ids[:, : start + int(steps)] if deferred else input_ids


def defers_reads(device: torch.device) -> bool:
    """Whether the loop on ``device`` reads nothing back per step (accelerators; on CPU a
    read costs nothing and the top-k shortcut is kept)."""
    return device.type != "cpu"


def _eager_step(model, input_ids, enc, inputs: dict, state: DecoderState):
    """One step of the model on the ids after ``state``: ``(B, V)`` float32 logits and the next state."""
    step = input_ids if state.length == 0 else input_ids[:, state.length :]
    out = model(decoder_input_ids=step, encoder_outputs=enc, cache=state, **inputs)
    # (B, V) float32; a copy only if the logits cover several positions (prefill)
    logits = out.logits[:, -1].to(dtype=torch.float32, device=input_ids.device)
    if out.logits.shape[1] > 1:
        logits = logits.clone()
    return logits, out.cache


def _drawer(gc, logits_processor, on_device: bool):
    """``draw(input_ids, logits) -> (tokens, scores)``: the processors, then a draw (sampling)
    or the argmax; ``scores`` are the processed scores (``decode`` keeps them a step longer).

    ``on_device``: without host reads (:func:`draw_on_device`); otherwise with
    the top-k shortcut of :func:`sample_top_k` / :func:`sample_tokens`.
    """
    fused = _trailing_top_k(logits_processor) if gc.do_sample and not on_device else None

    def draw(ids, logits):
        if fused is not None:  # the top-k warper and the draw in one top-k
            head, k = fused
            scores = head(ids, logits)
            tokens = sample_top_k(scores, k)
            if tokens is None:  # a tie at the k-th value: the warper keeps more than k
                tokens = sample_tokens(logits_processor[-1](ids, scores), k)
            return tokens, scores
        scores = logits_processor(ids, logits)
        if not gc.do_sample:
            return scores.argmax(-1), scores
        return (draw_on_device(scores) if on_device else sample_tokens(scores, gc.top_k)), scores

    return draw
