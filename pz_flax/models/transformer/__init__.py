"""A small decoder-only transformer language model and its cached decoding mode.

* `model_parts`: the model's named pieces (`TransformerLM`, `TransformerBlock`,
  `TransformerFeedForward`) and its `TransformerMetadata`.
* `simple_decoder`: a configuration and a builder for a pre-norm decoder with
  RMS normalization, rotary position embeddings and an optional `LayerStack`.
* `sampling_mode`: `KVCachingTransformerLM`, the same weights rewired to decode
  one token at a time with key/value caches.
* `simple_decoding_loop`: temperature sampling with the cached model.
* `variants`: published architectures (Llama, Mistral, Gemma, GPT-NeoX), their
  checkpoint loaders and Hugging Face converters.
"""

from pz_flax.models.transformer import model_parts
from pz_flax.models.transformer import sampling_mode
from pz_flax.models.transformer import simple_decoder
from pz_flax.models.transformer import simple_decoding_loop
from pz_flax.models.transformer import variants

__all__ = ["model_parts", "sampling_mode", "simple_decoder", "simple_decoding_loop", "variants"]
