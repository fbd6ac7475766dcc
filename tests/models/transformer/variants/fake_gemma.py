"""Random parameter dictionaries named and laid out as the released Gemma checkpoints.

See the docstring of ``pz_flax.models.transformer.variants.gemma`` for the layout.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class FakeGemma:
    """Sizes and layout of a fake checkpoint.

    Attributes:
      layers: Number of ``layer_{i}`` entries.
      heads: Number of query heads.
      kv_heads: Number of key/value heads (``heads`` stores a fused ``qkv_einsum``).
      gemma2: Whether the layers have Gemma 2's post-sublayer norms.
      transposed_gating: Store ``gating_einsum`` as ``[2, hidden, embed]`` (larger Gemma 2
        releases).
      embedding_dim, projection_dim, mlp_hidden_dim, vocab_size: Sizes.
    """

    layers: int
    heads: int
    kv_heads: int
    gemma2: bool = False
    transposed_gating: bool = False
    embedding_dim: int = 8
    projection_dim: int = 4
    mlp_hidden_dim: int = 12
    vocab_size: int = 17

    def preset_sizes(self) -> dict[str, int]:
        """The sizes as fields of ``LlamalikeTransformerConfig``."""
        return {
            "num_decoder_blocks": self.layers,
            "vocab_size": self.vocab_size,
            "num_kv_heads": self.kv_heads,
            "query_head_multiplier": self.heads // self.kv_heads,
            "embedding_dim": self.embedding_dim,
            "projection_dim": self.projection_dim,
            "mlp_hidden_dim": self.mlp_hidden_dim,
        }

    def params(self, dtype=np.float32, seed: int = 0) -> dict:
        """Random weights (scaled so that activations stay of order one)."""
        rng = np.random.default_rng(seed)
        embed, proj, hidden = self.embedding_dim, self.projection_dim, self.mlp_hidden_dim

        def w(*shape):
            return {"w": (rng.standard_normal(shape) * 0.3).astype(dtype)}

        def scale():
            return {"scale": (rng.standard_normal(embed) * 0.1).astype(dtype)}

        params = {
            "transformer/embedder": {
                "input_embedding": rng.standard_normal((self.vocab_size, embed)).astype(dtype)
            },
            "transformer/final_norm": scale(),
        }
        norms = ["pre_attention_norm", "pre_ffw_norm"]
        if self.gemma2:
            norms += ["post_attention_norm", "post_ffw_norm"]
        for i in range(self.layers):
            layer = f"transformer/layer_{i}"
            params.update({f"{layer}/{norm}": scale() for norm in norms})
            gating = (2, hidden, embed) if self.transposed_gating else (2, embed, hidden)
            params[f"{layer}/mlp/gating_einsum"] = w(*gating)
            params[f"{layer}/mlp/linear"] = w(hidden, embed)
            if self.heads == self.kv_heads:
                params[f"{layer}/attn/qkv_einsum"] = w(3, self.heads, embed, proj)
            else:
                params[f"{layer}/attn/q_einsum"] = w(self.heads, embed, proj)
                params[f"{layer}/attn/kv_einsum"] = w(2, self.kv_heads, embed, proj)
            params[f"{layer}/attn/attn_vec_einsum"] = w(self.heads, proj, embed)
        return params
