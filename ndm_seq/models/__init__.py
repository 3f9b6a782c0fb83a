"""The conversational model family (config + modeling), one place for a reader to find it."""

from ndm_seq.models.configuration_ndm import NDMConfig
from ndm_seq.models.modeling_ndm import (
    DecoderState,
    Decomposition,
    NDMEncoderOutput,
    NDMForConversation,
    NDMSeq2SeqOutput,
)

__all__ = [
    "DecoderState",
    "Decomposition",
    "NDMConfig",
    "NDMEncoderOutput",
    "NDMForConversation",
    "NDMSeq2SeqOutput",
]
