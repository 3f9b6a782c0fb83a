"""The conversational model family: seq2seq, CVAE, VMED and NDM on GRU and transformer backbones.

The data flow (docs/design.md §2), one module per part:

    context -> :class:`~ndm_seq.models.encoders.NDMEncoder` (states ``H``, summary
    ``h_c``, the prior's parameters) -> :mod:`~ndm_seq.models.latents` (per
    variant: nothing, a Gaussian ``z``, ``z`` decomposed and composed by the NDM,
    or VMED's per-step latents) -> :mod:`~ndm_seq.models.decoders` (GRU or
    transformer, conditioned on the latent, reading NDM slots per step) -> the
    tied output layer -> the losses (NLL + weighted KL + weighted extra terms).

:class:`NDMForConversation` builds the parts once from the config; its
``forward`` never looks at the variant or backbone.

Generation goes through transformers' ``GenerationMixin``. The encoder output
carries the prior's parameters, not a sample: ``generate`` expands encoder
outputs for ``num_return_sequences`` / beams *after* encoding, so the latent is
drawn at the first decoding step, one per returned sequence, and kept in the
decoder state (:class:`~ndm_seq.models.state.DecoderState`, our "cache"). Plain
sampling and greedy search run their decoding loop in
:mod:`ndm_seq.models.generation` (passed to ``GenerationMixin.generate`` as
``custom_generate``; the same greedy outputs and sampling distribution, less
work per step; the default on CPU); ``generate(..., fast_generate=False)``
keeps ``GenerationMixin``'s own.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel

from ndm_seq.models import generation
from ndm_seq.models.configuration_ndm import FORMAT_VERSION, NDMConfig
from ndm_seq.models.decoders import GRUDecoder, TransformerDecoder
from ndm_seq.models.encoders import GRUEncoder, NDMEncoder, TransformerEncoder
from ndm_seq.models.latents import (
    LATENTS,
    GaussianLatent,
    GivenLatent,
    LatentInputs,
    NDMLatent,
    build_latent,
)
from ndm_seq.models.layers import BagOfWords, Unpadded, reparameterize
from ndm_seq.models.outputs import (
    Decomposition,
    LatentOutput,
    NDMEncoderOutput,
    NDMSeq2SeqOutput,
    compose,
)
from ndm_seq.models.state import DecoderState
from ndm_seq.models.weights import check_weights, key_mapping, weight_files

# ``GenerationMixin.generate``'s own arguments (the rest configure generation or go to the model).
GENERATE_ARGUMENTS = {*inspect.signature(GenerationMixin.generate).parameters, "trust_remote_code"}

BACKBONES = {
    "gru": (GRUEncoder, GRUDecoder),
    "transformer": (TransformerEncoder, TransformerDecoder),
}
"""The encoder and decoder classes of each ``NDMConfig.backbone``."""

LOSS_TERMS = ("bow", "recon", "orth", "key_reg")
"""Extra loss terms (the model's bag-of-words head, the latent's others); each is weighted
by the config's ``<name>_weight``."""

__all__ = [
    "DecoderState",
    "Decomposition",
    "NDMEncoderOutput",
    "NDMForConversation",
    "NDMSeq2SeqOutput",
]


def shift_right(labels: torch.Tensor, start_id: int, pad_id: int) -> torch.Tensor:
    """Decoder inputs from labels: ``[start, y_1, ..., y_{T-1}]``, -100 replaced by padding."""
    out = labels.new_full(labels.shape, pad_id)
    out[:, 1:] = labels[:, :-1]
    out[:, 0] = start_id
    return out.masked_fill(out == -100, pad_id)


def scored_positions(labels: torch.Tensor) -> Unpadded | None:
    """The positions up to each row's last label, packed when that pays (else ``None``)."""
    keep = (labels != -100).flip(-1).cumsum(-1).flip(-1) > 0
    return Unpadded(keep) if Unpadded.pays(keep) else None


class NDMForConversation(PreTrainedModel, GenerationMixin):
    """Conversational encoder-decoder with an optional latent (docs/design.md §2): see the module docstring.

    ``forward(input_ids, attention_mask, labels=...)`` returns
    :class:`NDMSeq2SeqOutput` with the total loss and each term;
    ``generate(...)`` samples responses, one latent draw per returned sequence.
    """

    config_class = NDMConfig
    base_model_prefix = "model"  # no submodule has this name: HF would strip it from keys
    main_input_name = "input_ids"
    _supports_sdpa = True
    # The loss is a per-batch mean: the Trainer must not pass num_items_in_batch
    # nor rescale it for gradient accumulation as if it were a token sum.
    accepts_loss_kwargs = False

    def __init__(self, config: NDMConfig):
        super().__init__(config)
        # Built in this order (encoder, latent, decoder, bag-of-words head), so that a
        # seeded model starts from the same weights as before issue 12 split it into parts.
        encoder, decoder = BACKBONES[config.backbone]
        per_response = issubclass(LATENTS[config.variant], GaussianLatent)
        # The prior p(z|c) runs with the encoder: generate expands its output per sample.
        self.encoder = NDMEncoder(config, encoder, prior=per_response)
        self.latent = build_latent(config)
        dims = {"cond_dim": self.latent.cond_dim, "read_dim": self.latent.read_dim}
        if decoder is TransformerDecoder:
            dims["pos"] = self.encoder.pos
        self.decoder = decoder(config, **dims)
        if per_response and config.bow_weight > 0:
            d = config.d_model
            self.bow = BagOfWords(self.latent.cond_dim + d, d, config.vocab_size)
        self.kl_weight = float(config.kl_weight)
        self.post_init()

    def _init_weights(self, module):
        # PyTorch's default initialisations are kept (the NSM programs and keys
        # have their own, see ProgramMemory); only the tied embedding is set,
        # scaled so that logits start small.
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=self.config.d_model**-0.5)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()

    def get_encoder(self, modality=None):
        return self.encoder

    @property
    def shared(self) -> nn.Embedding:
        """The token embedding shared by encoder, decoder and the output layer."""
        return self.encoder.embed

    def get_input_embeddings(self):
        return self.encoder.embed

    def set_input_embeddings(self, value):
        self.encoder.embed = value

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        encoder_outputs: NDMEncoderOutput | None = None,
        cache: DecoderState | None = None,
        latent: torch.Tensor | None = None,
        slots: torch.Tensor | None = None,
        slot_weights: torch.Tensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        return_logits: bool = True,
        **kwargs,
    ) -> NDMSeq2SeqOutput:
        """Score a response (with ``labels``) or take decoding steps (``generate``).

        Args:
            input_ids: ``(B, S)`` context token ids (turns joined by the tokenizer).
            attention_mask: ``(B, S)``, 1 on real tokens.
            decoder_input_ids: ``(B, T)``; derived from ``labels`` when omitted.
            labels: ``(B, T)`` response ids ending with ``</s>``, -100 on padding.
                Given labels, latent variants use the posterior ``q(z|c,x)``
                (a sample in training mode, its mean in eval mode) and every
                loss term is computed.
            encoder_outputs: a precomputed :class:`NDMEncoderOutput`.
            cache: the :class:`DecoderState` of the previous step.
            latent: ``(B, d_z)`` an explicit latent instead of a prior draw
                (cvae, ndm: ``z``; vmed: the standard-normal noise of every
                step, with the most likely mixture mode).
            slots: ``(B, N, d_z)`` with ``slot_weights`` ``(B, N)``: an explicit
                (e.g. edited) NDM decomposition; the decoder is conditioned on
                ``compose(slots, slot_weights)`` and reads these slots.
            return_logits: ``False`` leaves ``logits`` out (``None``) when
                labels are given; the trainer and ``score_model`` use it, since
                the loss needs the logits of the scored positions only.

        With labels, the logits at positions after a row's last label are 0
        (not computed: the output layer runs on the scored positions only).
        """
        enc = (
            encoder_outputs
            if encoder_outputs is not None
            else self._encode(input_ids, attention_mask)
        )
        ids = self._decoder_inputs(decoder_input_ids, labels)
        state = cache if cache is not None else DecoderState()
        lat = self.latent(
            LatentInputs(
                enc, ids, labels, self.shared, self.encoder.encode_response, self.training,
                GivenLatent(latent, slots, slot_weights),
            ),
            state.latent,
        )  # fmt: skip
        where = scored_positions(labels) if labels is not None and state.length == 0 else None
        hidden, carry = self.decoder(
            self._embed(ids), enc, lat.cond, state, self.latent.reader(lat), where
        )
        logits, scored = self._output_layer(hidden, labels, where, return_logits)
        out = NDMSeq2SeqOutput(
            logits=logits,
            cache=None if carry is None else state.advance(ids.shape[1], lat.state, **carry),
            encoder_last_hidden_state=enc.last_hidden_state,
        )
        if labels is not None:
            if hasattr(self, "bow"):
                lat.terms["bow"] = self.bow.loss(lat.cond, enc.summary, labels)
            self._losses(out, labels, scored, lat)
        return out

    def _encode(self, input_ids, attention_mask) -> NDMEncoderOutput:
        if input_ids is None:
            raise ValueError("forward needs input_ids (the context) or encoder_outputs")
        return self.encoder(input_ids, attention_mask)

    def _decoder_inputs(self, decoder_input_ids, labels):
        if decoder_input_ids is not None:
            return decoder_input_ids
        if labels is None:
            raise ValueError("forward needs decoder_input_ids or labels")
        c = self.config
        return shift_right(labels, c.decoder_start_token_id, c.pad_token_id)

    def _embed(self, ids):
        """Decoder input embeddings ``(B, T, H)``; in training, word dropout to ``<unk>``."""
        c = self.config
        x = self.shared(ids)
        if self.training and c.word_dropout > 0:
            drop = torch.rand(ids.shape, device=ids.device) < c.word_dropout
            drop[:, 0] = False  # keep the start token
            x = torch.where(drop.unsqueeze(-1), self.shared.weight[c.unk_token_id], x)
        return x

    def _output_layer(self, hidden, labels, where, return_logits):
        """Tied output layer: ``(logits or None, (scored logits (N, V), their labels (N,)))``.

        With ``where``, only the scored positions are projected; logits elsewhere are 0.
        """
        if where is not None:
            scored = F.linear(where.pack(hidden), self.shared.weight)  # (T_real, V)
            logits = where.unpack(scored) if return_logits else None
            return logits, (scored, where.pack(labels))
        logits = F.linear(hidden, self.shared.weight)  # (B, T, V)
        scored = (logits.flatten(0, 1), labels.flatten() if labels is not None else None)
        return (logits if return_logits or labels is None else None), scored

    def _losses(self, out, labels, scored, lat: LatentOutput):
        """NLL + KL weight x KL + each extra term x its weight; every term into ``out``."""
        c = self.config
        logits, targets = scored
        # At least float32 (bf16 logits under autocast), and float64 for a float64 model,
        # so that the equivalence tests can compare two code paths in float64.
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        out.nll = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum") / len(labels)
        out.num_tokens = (labels != -100).sum()
        zero = out.nll.new_zeros(())
        for name in LOSS_TERMS:
            setattr(out, name, lat.terms.get(name, zero))
        loss = out.nll
        for name in LOSS_TERMS:
            if name in lat.terms:
                loss = loss + getattr(c, f"{name}_weight") * lat.terms[name]
        out.kl = zero if lat.kl is None else lat.kl
        out.kl_loss = zero if lat.kl_objective is None else self.kl_weight * lat.kl_objective
        out.posterior_mean, out.slot_weights = lat.posterior_mean, lat.slot_weights
        out.loss = loss + out.kl_loss

    # ------------------------------------------------------------------ generation

    def generate(self, input_ids=None, attention_mask=None, **kwargs):
        """``GenerationMixin.generate``, plus greedy decoding of ``k`` latent draws.

        transformers refuses ``num_return_sequences > 1`` without sampling or
        beams, since greedy decoding would repeat one sequence. For a latent
        variant each returned sequence has its own latent, so greedy decoding
        of ``k`` draws is meaningful: the contexts are repeated ``k`` times
        (rows ``i*k .. i*k+k-1`` belong to context ``i``, as with sampling).

        Plain sampling and greedy search (no beams, streamer, assistant or
        ``return_dict_in_generate`` outputs; eval mode) run the decoding loop
        of :mod:`ndm_seq.models.generation`: the standard loop's outputs with
        less work per step. It is the default for a model on CPU (3-4x faster
        there); on a GPU the standard loop was the faster one at the sizes
        measured (benchmarks/README.md). ``fast_generate=True`` / ``False``
        chooses explicitly.

        ``compile``: ``"off"`` (default), ``"default"``, ``"reduce-overhead"``
        (CUDA graphs), ``"max-autotune"`` or ``"aot_eager"``: the fast loop's
        steps after the first as one ``torch.compile`` graph of fixed shapes
        (:class:`~ndm_seq.models.generation.CompiledStep`); needs the fast loop.
        """
        k = kwargs.get("num_return_sequences") or 1
        sampling = kwargs.get("do_sample", self.generation_config.do_sample)
        beams = kwargs.get("num_beams") or self.generation_config.num_beams or 1
        fast = kwargs.pop("fast_generate", None)
        compile = kwargs.pop("compile", "off")
        if compile != "off":
            if fast is False:
                raise ValueError("compile needs the fast decoding loop; drop fast_generate=False")
            fast = True
        if fast is None:  # measured faster on CPU; on an H200 the standard loop was (README)
            fast = self.device.type == "cpu"
        group = None
        if (
            self.config.is_latent
            and k > 1
            and not sampling
            and beams == 1
            and input_ids is not None
        ):
            kwargs["num_return_sequences"] = 1
            input_ids = input_ids.repeat_interleave(k, dim=0)
            if attention_mask is not None:
                attention_mask = attention_mask.repeat_interleave(k, dim=0)
            if kwargs.get("latent") is not None:
                kwargs["latent"] = kwargs["latent"].repeat_interleave(k, dim=0)
            group = k
        if fast and generation.applies(self, self._generation_settings(kwargs), kwargs):
            kwargs["custom_generate"] = functools.partial(
                generation.decode, group=group, compile=compile
            )
        elif compile != "off":
            raise ValueError(
                "compile runs the fast decoding loop only: plain sampling or greedy search in "
                "eval mode (no beams, streamer, assistant or return_dict_in_generate outputs)"
            )
        if kwargs.get("cache") is None:
            # Our own decoding state: transformers' key/value caches cannot hold the latent.
            kwargs["cache"] = DecoderState()
        return super().generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def _generation_settings(self, kwargs) -> GenerationConfig:
        """The generation config this ``generate`` call will run with (call arguments over the defaults)."""
        config = copy.deepcopy(kwargs.get("generation_config") or self.generation_config)
        config.update(**{k: v for k, v in kwargs.items() if k not in GENERATE_ARGUMENTS})
        return config

    def prepare_inputs_for_generation(
        self,
        input_ids,
        cache=None,
        attention_mask=None,
        encoder_outputs=None,
        latent=None,
        slots=None,
        slot_weights=None,
        **kwargs,
    ):
        # The decoder state holds everything before the last token; the latent
        # draw lives in it, so it is kept even when use_cache=False.
        if cache is not None and cache.length > 0:
            input_ids = input_ids[:, -1:]
        return {
            "decoder_input_ids": input_ids,
            "encoder_outputs": encoder_outputs,
            "attention_mask": attention_mask,
            "cache": cache,
            "latent": latent,
            "slots": slots,
            "slot_weights": slot_weights,
        }

    # ------------------------------------------------------------------ decomposition API (docs/design.md §2.5)

    @torch.no_grad()
    def decompose(self, input_ids, attention_mask=None, labels=None, latent=None) -> Decomposition:
        """Decompose the latent of a context (and optionally its response) into NDM slots.

        Args:
            input_ids: ``(B, S)`` context ids; ``attention_mask`` ``(B, S)``.
            labels: ``(B, T)`` response ids (-100 on padding). Given, ``z`` is
                the posterior mean ``E[q(z|c,x)]``; otherwise the prior mean.
            latent: ``(B, d_z)`` the ``z`` to decompose instead (e.g. a prior draw
                from :meth:`draw_latents`).

        Returns:
            :class:`Decomposition` with ``z (B, d_z)``, ``slots (B, N, d_z)``,
            ``weights (B, N)`` and ``composed (B, d_z)``. Generate from it
            (edited or not) with ``generate(..., slots=d.slots, slot_weights=d.weights)``.
        """
        if not isinstance(self.latent, NDMLatent):
            raise ValueError(
                f"decompose needs variant 'ndm'; this model is {self.config.variant!r}"
            )
        enc = self.encoder(input_ids, attention_mask)
        if latent is not None:
            z = latent.to(enc.summary.dtype)
        elif labels is not None:
            z, _ = self.latent.posterior_params(enc.summary, self.encoder.encode_response(labels))
        else:
            z = enc.prior_mean
        return self.latent.decompose(z, enc.summary)

    @torch.no_grad()
    def draw_latents(self, input_ids, attention_mask=None, num_samples: int = 1) -> torch.Tensor:
        """``(B * num_samples, d_z)`` draws of ``z`` from the prior ``p(z|c)`` (cvae, ndm).

        Rows ``i * num_samples ..`` belong to context ``i``. Generate from them with
        ``generate(input_ids=<contexts repeated>, latent=z)``; decompose one with
        ``decompose(..., latent=z)``.
        """
        if not isinstance(self.latent, GaussianLatent):
            raise ValueError(
                f"draw_latents needs variant 'cvae' or 'ndm'; this model is {self.config.variant!r}"
            )
        enc = self.encoder(input_ids, attention_mask)
        mean = enc.prior_mean.repeat_interleave(num_samples, dim=0)
        return reparameterize(mean, enc.prior_logvar.repeat_interleave(num_samples, dim=0))

    @staticmethod
    def compose(slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The latent ``M^T w`` composed from ``slots (B, N, d_z)`` and ``weights (B, N)``."""
        return compose(slots, weights)

    # ------------------------------------------------------------------ safe loading

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """``PreTrainedModel.from_pretrained`` restricted to safetensors: nothing is ever unpickled.

        A local directory without ``model.safetensors`` (e.g. only a pickled
        ``pytorch_model.bin``) or with a corrupted one is refused with a clear
        error before any weight file could reach a pickle loader. Its weights must
        also fit the model its ``config.json`` describes (:func:`check_weights`):
        transformers would re-initialise a missing tensor at random and ignore an
        unexpected one, giving a model that loads and then samples noise.

        A folder saved in an older parameter layout (its ``config.json``'s
        ``format_version``, absent before version 2) loads through the key map
        of :mod:`ndm_seq.models.weights` (transformers' ``key_mapping``).
        """
        kwargs["use_safetensors"] = True
        path = Path(str(pretrained_model_name_or_path))
        if "key_mapping" not in kwargs:
            version = _format_version(pretrained_model_name_or_path, kwargs)
            kwargs["key_mapping"] = key_mapping(version)
        config = kwargs.get("config")
        if path.is_dir():
            files = weight_files(path)
            if not isinstance(config, NDMConfig):
                # The config transformers will build: the folder's (or the one named),
                # with the keyword arguments that are config fields applied.
                fields = {f.name for f in dataclasses.fields(NDMConfig)}
                overrides = {k: v for k, v in kwargs.items() if k in fields}
                source = config if isinstance(config, (str, os.PathLike)) else path
                config = NDMConfig.from_pretrained(source, **overrides)
            check_weights(files, config, kwargs.get("key_mapping"))
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """``PreTrainedModel.save_pretrained`` in the current layout, also for a model loaded from an old one.

        (transformers would otherwise write the names a ``key_mapping`` load started from.)
        A model loaded from a folder with ``ndm_seq_remote.py`` (its config's ``auto_map``)
        takes that file along, so the copy loads with ``trust_remote_code`` too.
        """
        from ndm_seq.remote_code import carry_remote_module

        kwargs.setdefault("save_original_format", False)
        self.config.format_version = FORMAT_VERSION  # what is written is the current layout
        out = super().save_pretrained(save_directory, *args, **kwargs)
        carry_remote_module(save_directory, getattr(self.config, "auto_map", None))
        return out


_HUB_ARGUMENTS = (
    "cache_dir",
    "force_download",
    "proxies",
    "token",
    "revision",
    "local_files_only",
    "subfolder",
)


def _format_version(name, kwargs) -> int:
    """The ``format_version`` of the ``config.json`` beside the weights (1 when absent: older layout)."""
    try:
        raw, _ = NDMConfig.get_config_dict(
            name, **{k: kwargs[k] for k in _HUB_ARGUMENTS if k in kwargs}
        )
    except OSError:  # no config.json there: the config passed in describes the weights
        return FORMAT_VERSION
    return raw.get("format_version", 1)
