"""Published transformer architectures, built from ``pz_flax.nn`` layers.

* `llamalike_common`: the family of Llama, Mistral and Gemma (configuration, builders and
  the shared Hugging Face conversion);
* `llama`, `mistral`: conversion of Hugging Face ``LlamaForCausalLM`` and
  ``MistralForCausalLM`` models;
* `gemma`: Gemma 1 and 2, loaded from the official checkpoints;
* `gpt_neox`: GPT-NeoX and Pythia (configuration, builders, Hugging Face conversion).

Every model is a `model_parts.TransformerLM`, so `sampling_mode.KVCachingTransformerLM`
decodes any of them with key/value caches. The Hugging Face converters need the
``huggingface`` extra (``transformers`` and ``torch``); nothing else does.
"""

from pz_flax.models.transformer.variants import gemma
from pz_flax.models.transformer.variants import gpt_neox
from pz_flax.models.transformer.variants import llama
from pz_flax.models.transformer.variants import llamalike_common
from pz_flax.models.transformer.variants import mistral

__all__ = ["gemma", "gpt_neox", "llama", "llamalike_common", "mistral"]
