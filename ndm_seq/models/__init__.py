"""The conversational model family (config + modeling), one place for a reader to find it."""

from transformers import AutoConfig, AutoModelForSeq2SeqLM

from ndm_seq.models.configuration_ndm import NDMConfig
from ndm_seq.models.modeling_ndm import (
    DecoderState,
    Decomposition,
    NDMEncoderOutput,
    NDMForConversation,
    NDMSeq2SeqOutput,
)
from ndm_seq.tokenization_ndm import register_tokenizer

# What `import ndm_seq` promises: transformers' Auto classes know model_type "ndm".
AutoConfig.register("ndm", NDMConfig, exist_ok=True)
AutoModelForSeq2SeqLM.register(NDMConfig, NDMForConversation, exist_ok=True)
register_tokenizer(NDMConfig)

__all__ = [
    "DecoderState",
    "Decomposition",
    "NDMConfig",
    "NDMEncoderOutput",
    "NDMForConversation",
    "NDMSeq2SeqOutput",
]
