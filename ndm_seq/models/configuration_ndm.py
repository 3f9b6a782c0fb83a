"""NDMConfig: one config for the whole model family (docs/design.md §2, §3, §7)."""

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from ndm_seq.memory import check_memory_args

__all__ = ["FORMAT_VERSION", "NDMConfig"]

FORMAT_VERSION = 2
"""Layout of the saved parameters: 1 before issue 12 (no ``format_version`` in
``config.json``), 2 since (decoder and latent parameters in their own modules).
``ndm_seq.models.weights.KEY_MAPPINGS`` maps older layouts on loading."""

VARIANTS = ("seq2seq", "cvae", "vmed", "ndm")

MAX_SIZES: dict[str, int] = {
    "vocab_size": 2**20,
    "d_model": 16_384,
    "encoder_layers": 256,
    "decoder_layers": 256,
    "num_heads": 1024,
    "ffn_dim": 131_072,
    "max_position_embeddings": 131_072,
    "latent_dim": 16_384,
    "num_slots": 4096,
    "num_programs": 4096,
    "num_reads": 256,
    "vmed_heads": 1024,
    "vmed_memory_dim": 16_384,
    "vmed_memory_words": 65_536,
}
"""The largest value of each size field :class:`NDMConfig` accepts. Generous: several
times the largest models in use (a 256k vocabulary, 16k hidden size, about 120
layers), far beyond what a dialogue model of this family needs. They exist so that an
untrusted ``config.json`` (``encoder_layers: 1000000``) is refused in one line when it
loads, before a model of that size is built (minutes and gigabytes before the weights
could be compared with it)."""
BACKBONES = ("gru", "transformer")

_PRESETS: dict[str, dict] = {
    # Unit tests and smoke runs: every variant x backbone builds and runs in milliseconds.
    "tiny": dict(
        vocab_size=64,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        num_heads=2,
        ffn_dim=32,
        latent_dim=8,
        num_slots=2,
        num_programs=2,
        vmed_heads=2,
        vmed_memory_dim=8,
        vmed_memory_words=4,
        max_position_embeddings=64,
        dropout=0.0,
    ),
    # Trains on 2 CPU cores in minutes; the defaults docs/design.md §2.3 explains
    # (GRU, d_z 64, N 4, P 4, R 1, relative ridge 1e-3, free bits 0.1, word dropout 0.25).
    "small": dict(
        vocab_size=8000,
        d_model=256,
        encoder_layers=1,
        decoder_layers=1,
        num_heads=4,
        ffn_dim=1024,
        latent_dim=64,
        num_slots=4,
        num_programs=4,
        free_bits=0.1,
        word_dropout=0.25,
        bow_weight=1.0,
        dropout=0.1,
    ),
}


@strict
class NDMConfig(PreTrainedConfig):
    r"""Configuration of :class:`~ndm_seq.NDMForConversation`.

    Every variant runs on every backbone; fields that a variant does not use
    are ignored by it (e.g. ``num_slots`` outside ``ndm``). A wrong type or an
    impossible value (unknown variant, ``num_slots <= 0``, ``ridge < 0``, a size
    above :data:`MAX_SIZES`, ...) raises ``huggingface_hub.errors.StrictDataclassError``
    naming the field, when built and when loaded from ``config.json``.

    Args:
        variant: ``"seq2seq"`` (no latent), ``"cvae"`` (one Gaussian latent per
            response), ``"vmed"`` (a latent per decoding step with a
            mixture-of-Gaussians prior read from a memory of the context) or
            ``"ndm"`` (a CVAE latent decomposed into slots and composed back).
        backbone: ``"gru"`` (bidirectional GRU encoder, GRU decoder with
            attention) or ``"transformer"`` (pre-LayerNorm encoder-decoder with
            ``scaled_dot_product_attention`` and a KV cache).
        vocab_size: vocabulary size (must match the tokenizer).
        d_model: hidden size of encoder and decoder (GRU: total of both
            directions of the encoder) and size of the tied embeddings.
        encoder_layers: encoder depth (GRU layers or transformer blocks).
        decoder_layers: decoder depth.
        num_heads: attention heads (transformer only); divides ``d_model``.
        ffn_dim: feed-forward width of the transformer blocks.
        dropout: dropout probability of embeddings, residual branches and
            the GRUs.
        attention_dropout: dropout probability of the attention weights
            (transformer; 0 as in BART's default). Non-zero also sends CPU
            training to PyTorch's slower non-fused attention kernel.
        max_position_embeddings: longest sequence the transformer's learned
            positions cover; longer contexts are truncated from the left by the
            tokenizer.
        latent_dim: ``d_z``, size of the response latent (cvae, ndm, vmed).
        free_bits: KL free bits in nats per latent dimension (0 = off); each
            dimension's batch-mean KL is clamped from below before summing.
        kl_weight: initial KL weight ``beta``; the trainer may set
            ``model.kl_weight`` every step (annealing).
        bow_weight: weight ``gamma`` of the bag-of-words loss (0 = off).
        word_dropout: probability of replacing a decoder input token by
            ``<unk>`` during training (0 = off).
        num_slots: ``N``, NDM memory slots. Keep ``N < latent_dim``: the read
            projects onto the slots' span, and slots spanning the whole latent
            space make ``z' = z`` (nothing decomposed).
        num_programs: ``P``, NSM programs generating the slot projections.
        program_rank: rank of each program (``None``: full ``d_z x d_z``).
        num_reads: ``R``, recurrent least-squares reads composing ``z'``.
        ridge: relative ridge of the least-squares reads (>= 0).
        update_memory: erase/add memory update between recurrent reads.
        ndm_read: where the slots reach the decoder: ``"latent"`` (the composed
            ``z'`` replaces ``z``), ``"step"`` (``z`` is kept and the decoder
            reads the slots at every step with least-squares attention) or
            ``"both"`` (``z'`` and per-step reads).
        recon_weight: weight ``alpha`` of ``||z - z'||^2``.
        recon_scale: ``"absolute"`` (the term is ``||z - z'||^2``) or
            ``"relative"`` (``d_z ||z - z'||^2 / ||z||^2``: the same at the scale
            of a standard-normal ``z``, and unchanged when the whole latent
            space shrinks, which the absolute term rewards:
            docs/experiments.md section 12).
        orth_weight: weight ``eta`` of the slot orthogonality penalty.
        key_reg_weight: weight of NSM's key-diversity regulariser.
        vmed_heads: ``K``, VMED read heads = mixture components of its prior.
        vmed_memory_dim: width of VMED's memory slots.
        vmed_memory: VMED's memory: ``"dnc"`` (the default: the DNC its
            authors built, written by an encoder-side controller over the
            context and read with content and temporal modes,
            :mod:`ndm_seq.models.dnc`) or ``"simplified"`` (the context states
            projected to ``vmed_memory_dim``, read by content only). A
            ``config.json`` without this field was saved before it existed and
            loads as ``"simplified"``, the memory its weights belong to.
        vmed_memory_words: ``N``, words of the DNC memory (``vmed_memory="dnc"``).
        format_version: the parameter layout the weights were saved in
            (:data:`FORMAT_VERSION`; older folders load through a key map).
    """

    model_type = "ndm"
    attribute_map = {  # noqa: RUF012 (a class attribute read by PreTrainedConfig, as in BART)
        "hidden_size": "d_model",
        "num_attention_heads": "num_heads",
        "num_hidden_layers": "encoder_layers",
    }

    variant: Literal["seq2seq", "cvae", "vmed", "ndm"] = "ndm"
    backbone: Literal["gru", "transformer"] = "gru"
    vocab_size: int = 8000
    d_model: int = 256
    encoder_layers: int = 1
    decoder_layers: int = 1
    num_heads: int = 4
    ffn_dim: int = 1024
    dropout: float | int = 0.1
    attention_dropout: float | int = 0.0
    max_position_embeddings: int = 512
    latent_dim: int = 64
    free_bits: float | int = 0.0
    kl_weight: float | int = 1.0
    bow_weight: float | int = 0.0
    word_dropout: float | int = 0.0
    num_slots: int = 4
    num_programs: int = 4
    program_rank: int | None = None
    num_reads: int = 1
    ridge: float | int = 1e-3
    update_memory: bool = True
    ndm_read: Literal["latent", "step", "both"] = "latent"
    recon_weight: float | int = 0.0
    recon_scale: Literal["absolute", "relative"] = "absolute"
    orth_weight: float | int = 0.0
    key_reg_weight: float | int = 0.01
    vmed_heads: int = 4
    vmed_memory_dim: int = 64
    vmed_memory: Literal["dnc", "simplified"] = "dnc"
    vmed_memory_words: int = 16
    pad_token_id: int | None = 0
    unk_token_id: int | None = 1
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 3
    decoder_start_token_id: int | None = 2
    is_encoder_decoder: bool = True
    tie_word_embeddings: bool = True
    use_cache: bool = True
    format_version: int = FORMAT_VERSION

    def validate_ndm_fields(self):
        """Reject impossible values with a message naming the field."""
        for name in (
            "vocab_size",
            "d_model",
            "encoder_layers",
            "decoder_layers",
            "num_heads",
            "ffn_dim",
            "max_position_embeddings",
            "latent_dim",
            "vmed_heads",
            "vmed_memory_dim",
            "vmed_memory_words",
        ):
            value = getattr(self, name)
            # Aliases (hidden_size -> d_model, ...) bypass the dataclass's type check.
            alias = {v: k for k, v in self.attribute_map.items()}.get(name)
            label = f"{name} (alias {alias})" if alias else name
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"NDMConfig.{label} must be an int; got {value!r}")
            if value <= 0:
                raise ValueError(f"NDMConfig.{label} must be > 0; got {value}")
        for name, limit in MAX_SIZES.items():
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool) and value > limit:
                raise ValueError(
                    f"NDMConfig.{name} must be <= {limit} (ndm_seq.models.configuration_ndm."
                    f"MAX_SIZES); got {value}"
                )
        if self.backbone == "transformer" and self.d_model % self.num_heads:
            raise ValueError(
                f"NDMConfig.d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.backbone == "gru" and self.d_model % 2:
            raise ValueError(
                f"NDMConfig.d_model must be even for the bidirectional GRU encoder; got {self.d_model}"
            )
        for name in ("dropout", "attention_dropout", "word_dropout"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ValueError(f"NDMConfig.{name} must be in [0, 1); got {value}")
        for name in (
            "free_bits",
            "kl_weight",
            "bow_weight",
            "recon_weight",
            "orth_weight",
            "key_reg_weight",
        ):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"NDMConfig.{name} must be >= 0; got {value}")
        if self.variant == "ndm":
            check_memory_args(
                self.latent_dim,
                self.num_slots,
                self.num_programs,
                num_reads=self.num_reads,
                ridge=self.ridge,
                program_rank=self.program_rank,
                context_dim=self.d_model,
            )
        elif not self.ridge >= 0:
            raise ValueError(f"NDMConfig.ridge must be >= 0; got {self.ridge}")

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """``PreTrainedConfig.from_dict``; a dict without ``vmed_memory`` (saved before it) is ``"simplified"``."""
        if "vmed_memory" not in config_dict:
            config_dict = {**config_dict, "vmed_memory": "simplified"}
        return super().from_dict(config_dict, **kwargs)

    @property
    def is_latent(self) -> bool:
        """True for the variants with a latent variable (cvae, vmed, ndm)."""
        return self.variant != "seq2seq"

    @classmethod
    def preset(cls, name: str, **overrides) -> "NDMConfig":
        """A named configuration with ``overrides`` applied.

        Args:
            name: ``"tiny"`` (unit tests, smoke runs) or ``"small"`` (trains on
                2 CPU cores in minutes).
            **overrides: any config field, e.g. ``variant="cvae"``.
        """
        if name not in _PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {sorted(_PRESETS)}")
        return cls(**(_PRESETS[name] | overrides))
