"""ndm-seq: dialogue sequence modeling with Neural Decompositional Memory.

Importing the package registers the model with transformers' Auto classes
(``AutoConfig``, ``AutoModelForSeq2SeqLM``, ``AutoTokenizer``) under
``model_type = "ndm"``.
"""

from transformers import AutoConfig, AutoModelForSeq2SeqLM

from ndm_seq.models import NDMConfig, NDMForConversation
from ndm_seq.tokenization_ndm import NDMTokenizer, register_tokenizer

__version__ = "0.1.0"

AutoConfig.register("ndm", NDMConfig, exist_ok=True)
AutoModelForSeq2SeqLM.register(NDMConfig, NDMForConversation, exist_ok=True)
register_tokenizer(NDMConfig)

__all__ = ["NDMConfig", "NDMForConversation", "NDMTokenizer", "__version__"]
