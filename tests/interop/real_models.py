"""Small NNX models written the way Flax users write them, for the end-to-end interop tests.

Each model has the features of a family of public NNX models (user classes with their own
``__call__``, stock layers with explicit settings, extra call arguments, stacked layers,
sharding annotations), at a size that runs in milliseconds on CPU. They are written for these
tests, in the style of such models, not copied from any of them.

Every ``make_*`` function returns a ``ModelCase``: the module, example inputs (positional, as
the NNX model takes them), how to name the positional input for pz_flax, the call's keyword
arguments, and a scalar loss over the NNX output for gradient and training checks.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from pz_flax.core import named_axes
from pz_flax.core import struct
from pz_flax.nn import layer as layer_base

#### Gemma-style decoder: GQA, RoPE, own RMSNorm, QK-norm, tied embedding ####


class ScaleRMSNorm(nnx.Module):
    """RMS normalization with a zero-initialised ``1 + scale`` gain, as Gemma writes it."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        del rngs
        self.scale = nnx.Param(jnp.zeros((dim,), jnp.float32))

    def __call__(self, x):
        variance = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        return x * jax.lax.rsqrt(variance + 1e-6) * (1 + self.scale[...])


def apply_rope(x, positions, max_wavelength=10_000):
    """Rotary position embedding over the last axis of ``x`` (batch, seq, heads, dim)."""
    half = x.shape[-1] // 2
    fraction = 2 * jnp.arange(half) / x.shape[-1]
    timescale = max_wavelength**fraction
    angles = positions[..., None, None] / timescale
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    first, second = x[..., :half], x[..., half:]
    return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


class GemmaAttention(nnx.Module):
    def __init__(self, embed_dim, num_heads, num_kv_heads, head_dim, *, rngs):
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        settings = dict(dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)
        self.q_einsum = nnx.Einsum("BTD,DNH->BTNH", (embed_dim, num_heads, head_dim), **settings)
        self.k_einsum = nnx.Einsum("BSD,DKH->BSKH", (embed_dim, num_kv_heads, head_dim), **settings)
        self.v_einsum = nnx.Einsum("BSD,DKH->BSKH", (embed_dim, num_kv_heads, head_dim), **settings)
        self.attn_vec_einsum = nnx.Einsum(
            "BTNH,NHD->BTD", (num_heads, head_dim, embed_dim), **settings
        )
        self.query_norm = ScaleRMSNorm(head_dim, rngs=rngs)
        self.key_norm = ScaleRMSNorm(head_dim, rngs=rngs)

    def __call__(self, x, positions, attention_mask):
        query = apply_rope(self.query_norm(self.q_einsum(x)), positions)
        key = apply_rope(self.key_norm(self.k_einsum(x)), positions)
        value = self.v_einsum(x)
        groups = self.num_heads // self.num_kv_heads
        key, value = jnp.repeat(key, groups, axis=2), jnp.repeat(value, groups, axis=2)
        logits = jnp.einsum("BTNH,BSNH->BTNS", query, key) / math.sqrt(query.shape[-1])
        logits = jnp.where(attention_mask[:, :, None, :], logits, -1e30)
        weights = jax.nn.softmax(logits, axis=-1)
        self.sow(nnx.Intermediate, "attention_weights", weights)
        return self.attn_vec_einsum(jnp.einsum("BTNS,BSNH->BTNH", weights, value))


class GemmaMLP(nnx.Module):
    def __init__(self, embed_dim, hidden_dim, *, rngs):
        settings = dict(use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)
        self.gate = nnx.Linear(embed_dim, hidden_dim, **settings)
        self.up = nnx.Linear(embed_dim, hidden_dim, **settings)
        self.down = nnx.Linear(hidden_dim, embed_dim, **settings)

    def __call__(self, x):
        return self.down(nnx.gelu(self.gate(x)) * self.up(x))


class GemmaBlock(nnx.Module):
    def __init__(self, embed_dim, num_heads, num_kv_heads, head_dim, hidden_dim, *, rngs):
        self.pre_attention_norm = ScaleRMSNorm(embed_dim, rngs=rngs)
        self.attn = GemmaAttention(embed_dim, num_heads, num_kv_heads, head_dim, rngs=rngs)
        self.pre_ffw_norm = ScaleRMSNorm(embed_dim, rngs=rngs)
        self.mlp = GemmaMLP(embed_dim, hidden_dim, rngs=rngs)

    def __call__(self, x, positions, attention_mask):
        x = x + self.attn(self.pre_attention_norm(x), positions, attention_mask)
        return x + self.mlp(self.pre_ffw_norm(x))


class GemmaStyleDecoder(nnx.Module):
    def __init__(self, vocab=19, embed_dim=8, num_layers=2, *, rngs):
        self.embedder = nnx.Embed(vocab, embed_dim, param_dtype=jnp.float32, rngs=rngs)
        self.layers = nnx.List(
            [GemmaBlock(embed_dim, 4, 2, 4, 16, rngs=rngs) for _ in range(num_layers)]
        )
        self.final_norm = ScaleRMSNorm(embed_dim, rngs=rngs)

    def __call__(self, tokens, positions, attention_mask):
        x = self.embedder(tokens) * jnp.sqrt(jnp.float32(self.embedder.features))
        for layer in self.layers:
            x = layer(x, positions, attention_mask)
        return self.embedder.attend(self.final_norm(x))


#### Qwen3-style decoder: nnx.Einsum everywhere, KV cache, positions and mask ####


class QwenAttention(nnx.Module):
    def __init__(self, embed_dim, num_heads, head_dim, *, rngs):
        self.q_proj = nnx.Einsum("BTD,DNH->BTNH", (embed_dim, num_heads, head_dim), rngs=rngs)
        self.k_proj = nnx.Einsum("BTD,DNH->BTNH", (embed_dim, num_heads, head_dim), rngs=rngs)
        self.v_proj = nnx.Einsum("BTD,DNH->BTNH", (embed_dim, num_heads, head_dim), rngs=rngs)
        self.o_proj = nnx.Einsum("BTNH,NHD->BTD", (num_heads, head_dim, embed_dim), rngs=rngs)
        self.q_norm = nnx.RMSNorm(head_dim, rngs=rngs)
        self.k_norm = nnx.RMSNorm(head_dim, rngs=rngs)

    def __call__(self, x, cache, positions, mask):
        query = apply_rope(self.q_norm(self.q_proj(x)), positions)
        key = apply_rope(self.k_norm(self.k_proj(x)), positions)
        value = self.v_proj(x)
        if cache is not None:
            start = cache["end"]
            key = jax.lax.dynamic_update_slice_in_dim(cache["k"], key, start, axis=1)
            value = jax.lax.dynamic_update_slice_in_dim(cache["v"], value, start, axis=1)
            cache = {"k": key, "v": value, "end": start + x.shape[1]}
        logits = jnp.einsum("BTNH,BSNH->BTNS", query, key) / math.sqrt(query.shape[-1])
        logits = jnp.where(mask[:, :, None, :], logits, -1e30)
        output = jnp.einsum("BTNS,BSNH->BTNH", jax.nn.softmax(logits, axis=-1), value)
        return cache, self.o_proj(output)


class QwenDecoder(nnx.Module):
    def __init__(self, vocab=23, embed_dim=8, num_layers=2, *, rngs):
        self.embedder = nnx.Embed(vocab, embed_dim, rngs=rngs)
        self.layers = nnx.List(
            [QwenAttention(embed_dim, 2, 4, rngs=rngs) for _ in range(num_layers)]
        )
        self.norms = nnx.List([nnx.RMSNorm(embed_dim, rngs=rngs) for _ in range(num_layers)])
        self.lm_head = nnx.Linear(embed_dim, vocab, use_bias=False, rngs=rngs)

    def init_cache(self, batch, length):
        shape = (batch, length, 2, 4)
        return [
            {"k": jnp.zeros(shape), "v": jnp.zeros(shape), "end": jnp.int32(0)} for _ in self.layers
        ]

    def __call__(self, tokens, positions, cache, attention_mask):
        x = self.embedder(tokens)
        new_cache = []
        for index, (layer, norm) in enumerate(zip(self.layers, self.norms)):
            layer_cache, update = layer(
                norm(x), None if cache is None else cache[index], positions, attention_mask
            )
            new_cache.append(layer_cache)
            x = x + update
        return self.lm_head(x), (None if cache is None else new_cache)


#### ResNet: bias-free convolutions, BatchNorm, max_pool ####


class ResidualBlock(nnx.Module):
    def __init__(self, channels, *, rngs):
        self.conv1 = nnx.Conv(channels, channels, (3, 3), use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(channels, rngs=rngs)
        self.conv2 = nnx.Conv(channels, channels, (3, 3), use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(channels, rngs=rngs)

    def __call__(self, x):
        y = nnx.relu(self.bn1(self.conv1(x)))
        return nnx.relu(x + self.bn2(self.conv2(y)))


class ResNet(nnx.Module):
    def __init__(self, classes=5, channels=4, *, rngs):
        self.stem = nnx.Conv(3, channels, (3, 3), use_bias=False, rngs=rngs)
        self.stem_bn = nnx.BatchNorm(channels, rngs=rngs)
        self.blocks = nnx.List([ResidualBlock(channels, rngs=rngs) for _ in range(2)])
        self.head = nnx.Linear(channels, classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.stem_bn(self.stem(x)))
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))
        for block in self.blocks:
            x = block(x)
        return self.head(jnp.mean(x, axis=(1, 2)))


#### ViT on nnx.MultiHeadAttention ####


class ViTBlock(nnx.Module):
    def __init__(self, dim, heads, *, rngs):
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.mlp = nnx.Sequential(
            nnx.Linear(dim, 2 * dim, rngs=rngs), nnx.gelu, nnx.Linear(2 * dim, dim, rngs=rngs)
        )

    def __call__(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nnx.Module):
    def __init__(self, classes=3, patch=4, dim=8, depth=2, *, rngs):
        self.patch_embed = nnx.Conv(3, dim, (patch, patch), strides=(patch, patch), rngs=rngs)
        self.cls_token = nnx.Param(jnp.zeros((1, 1, dim)))
        self.pos_embed = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, 5, dim)))
        self.blocks = nnx.List([ViTBlock(dim, 2, rngs=rngs) for _ in range(depth)])
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, classes, rngs=rngs)

    def __call__(self, images):
        patches = self.patch_embed(images)
        batch = patches.shape[0]
        x = patches.reshape(batch, -1, patches.shape[-1])
        cls = jnp.broadcast_to(self.cls_token[...], (batch, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


#### MNIST CNN: train-mode BatchNorm, Dropout with its own RNG stream ####


class MnistCNN(nnx.Module):
    def __init__(self, *, rngs):
        self.conv1 = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.batch_norm1 = nnx.BatchNorm(4, rngs=rngs)
        self.dropout1 = nnx.Dropout(0.1, rngs=rngs)
        self.conv2 = nnx.Conv(4, 8, (3, 3), rngs=rngs)
        self.batch_norm2 = nnx.BatchNorm(8, rngs=rngs)
        self.linear1 = nnx.Linear(8 * 3 * 3, 16, rngs=rngs)
        self.dropout2 = nnx.Dropout(0.1, rngs=rngs)
        self.linear2 = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x, rngs: nnx.Rngs | None = None):
        x = nnx.avg_pool(
            nnx.relu(self.batch_norm1(self.dropout1(self.conv1(x), rngs=rngs))),
            window_shape=(2, 2),
            strides=(2, 2),
        )
        x = nnx.avg_pool(
            nnx.relu(self.batch_norm2(self.conv2(x))), window_shape=(2, 2), strides=(2, 2)
        )
        x = x.reshape(x.shape[0], -1)
        x = self.dropout2(nnx.relu(self.linear1(x)), rngs=rngs)
        return self.linear2(x)


#### Scan over layers: nnx.vmap to create, nnx.scan to run ####


class ScanBlock(nnx.Module):
    def __init__(self, dim, *, rngs):
        self.linear = nnx.Linear(dim, dim, rngs=rngs)
        self.norm = nnx.LayerNorm(dim, rngs=rngs)

    def __call__(self, x):
        return x + nnx.gelu(self.norm(self.linear(x)))


class ScanMLP(nnx.Module):
    def __init__(self, dim=8, num_layers=3, *, rngs):
        @nnx.split_rngs(splits=num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create_block(rngs):
            return ScanBlock(dim, rngs=rngs)

        self.blocks = create_block(rngs)
        self.num_layers = num_layers

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def forward(x, block):
            return block(x)

        return forward(x, self.blocks)


#### MiniGPT: a PartitionSpec on every weight, created with eager sharding off ####


def _sharded(init, *names):
    return nnx.with_partitioning(init, PartitionSpec(*names))


class MiniGPTBlock(nnx.Module):
    def __init__(self, dim, heads, *, rngs):
        kernel = nnx.initializers.xavier_uniform()
        self.attn = nnx.MultiHeadAttention(
            heads,
            dim,
            decode=False,
            kernel_init=_sharded(kernel, None, "model"),
            bias_init=_sharded(nnx.initializers.zeros_init(), "model"),
            rngs=rngs,
        )
        self.norm1 = nnx.LayerNorm(
            dim,
            scale_init=_sharded(nnx.initializers.ones_init(), "model"),
            bias_init=_sharded(nnx.initializers.zeros_init(), "model"),
            rngs=rngs,
        )
        self.up = nnx.Linear(
            dim,
            2 * dim,
            kernel_init=_sharded(kernel, None, "model"),
            bias_init=_sharded(nnx.initializers.zeros_init(), "model"),
            rngs=rngs,
        )
        self.down = nnx.Linear(
            2 * dim,
            dim,
            kernel_init=_sharded(kernel, "model", None),
            bias_init=_sharded(nnx.initializers.zeros_init(), None),
            rngs=rngs,
        )

    def __call__(self, x, mask):
        x = x + self.attn(self.norm1(x), mask=mask)
        return x + self.down(nnx.relu(self.up(x)))


class MiniGPT(nnx.Module):
    def __init__(self, vocab=17, dim=8, depth=2, *, rngs):
        self.token_embed = nnx.Embed(
            vocab,
            dim,
            embedding_init=_sharded(nnx.initializers.normal(1.0), None, "model"),
            rngs=rngs,
        )
        self.blocks = nnx.List([MiniGPTBlock(dim, 2, rngs=rngs) for _ in range(depth)])
        self.out = nnx.Linear(
            dim,
            vocab,
            kernel_init=_sharded(nnx.initializers.xavier_uniform(), None, "model"),
            bias_init=_sharded(nnx.initializers.zeros_init(), "model"),
            rngs=rngs,
        )

    def __call__(self, tokens):
        length = tokens.shape[1]
        mask = nnx.make_causal_mask(jnp.ones((tokens.shape[0], length)))
        x = self.token_embed(tokens)
        for block in self.blocks:
            x = block(x, mask)
        return self.out(x)


#### Bidirectional LSTM/GRU ####


class BiRNNTagger(nnx.Module):
    def __init__(self, in_features=4, hidden=6, classes=3, *, rngs):
        forward = nnx.RNN(nnx.LSTMCell(in_features, hidden, rngs=rngs), rngs=rngs)
        backward = nnx.RNN(nnx.GRUCell(in_features, hidden, rngs=rngs), rngs=rngs)
        self.encoder = nnx.Bidirectional(forward, backward, rngs=rngs)
        self.head = nnx.Linear(2 * hidden, classes, rngs=rngs)

    def __call__(self, x):
        return self.head(self.encoder(x))


#### A pz_flax layer of the user's own, for edits ####


@struct.pytree_dataclass
class ScaleByName(layer_base.Layer):
    """Multiplies its input by a named array, broadcast by axis name (e.g. to ablate a head).

    Defined here, beside the models, so that checkpoints of edited models restore with
    ``allow_modules=["tests.interop.real_models"]``.
    """

    factor: named_axes.NamedArray

    def __call__(self, value, **_unused_side_inputs):
        return value * self.factor


#### Cases ####


@dataclasses.dataclass
class ModelCase:
    """A model with example inputs, as the end-to-end tests use it.

    Attributes:
        name: Short name for test ids.
        make: Builds the NNX model (fresh weights, fixed seed).
        inputs: The positional input the NNX model takes.
        input_names: Names for that input on the pz_flax side.
        call_kwargs: The other call arguments, passed by keyword to both worlds.
        output_names: How to read the pz_flax output back into NNX's layout.
    """

    name: str
    make: Callable[[], nnx.Module]
    inputs: Any
    input_names: tuple[str, ...]
    call_kwargs: dict[str, Any]
    output_names: tuple[str, ...]

    def loss(self, output):
        """A scalar loss over the (positional) model output."""
        logits = output[0] if isinstance(output, tuple) else output
        return jnp.mean(jnp.square(logits - 0.5))


def _causal(batch, length):
    return jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)), (batch, length, length))


def _tokens(vocab, shape=(2, 5), seed=3):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


def _images(shape, seed=4):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _positions(batch=2, length=5):
    return jnp.broadcast_to(jnp.arange(length), (batch, length))


def gemma_case():
    return ModelCase(
        name="gemma",
        make=lambda: GemmaStyleDecoder(rngs=nnx.Rngs(0)),
        inputs=_tokens(19),
        input_names=("batch", "seq"),
        call_kwargs={"positions": _positions(), "attention_mask": _causal(2, 5)},
        output_names=("batch", "seq", "vocabulary"),
    )


def qwen_case():
    return ModelCase(
        name="qwen",
        make=lambda: QwenDecoder(rngs=nnx.Rngs(1)),
        inputs=_tokens(23),
        input_names=("batch", "seq"),
        call_kwargs={"positions": _positions(), "cache": None, "attention_mask": _causal(2, 5)},
        output_names=("batch", "seq", "vocabulary"),
    )


def resnet_case():
    return ModelCase(
        name="resnet",
        make=lambda: ResNet(rngs=nnx.Rngs(2)),
        inputs=_images((2, 8, 8, 3)),
        input_names=("batch", "height", "width", "features"),
        call_kwargs={},
        output_names=("batch", "features"),
    )


def vit_case():
    return ModelCase(
        name="vit",
        make=lambda: ViT(rngs=nnx.Rngs(3)),
        inputs=_images((2, 8, 8, 3)),
        input_names=("batch", "height", "width", "features"),
        call_kwargs={},
        output_names=("batch", "features"),
    )


def mnist_case():
    return ModelCase(
        name="mnist",
        make=lambda: MnistCNN(rngs=nnx.Rngs(4)),
        inputs=_images((2, 12, 12, 1)),
        input_names=("batch", "height", "width", "features"),
        call_kwargs={},
        output_names=("batch", "features"),
    )


def scan_case():
    return ModelCase(
        name="scan_mlp",
        make=lambda: ScanMLP(rngs=nnx.Rngs(5)),
        inputs=_images((2, 8)),
        input_names=("batch", "features"),
        call_kwargs={},
        output_names=("batch", "features"),
    )


def make_minigpt():
    """A MiniGPT built with eager sharding off, so that it needs no mesh to exist or run."""
    with nnx.use_eager_sharding(False):
        return MiniGPT(rngs=nnx.Rngs(6))


def minigpt_case():
    return ModelCase(
        name="minigpt",
        make=make_minigpt,
        inputs=_tokens(17),
        input_names=("batch", "seq"),
        call_kwargs={},
        output_names=("batch", "seq", "vocabulary"),
    )


def birnn_case():
    return ModelCase(
        name="birnn",
        make=lambda: BiRNNTagger(rngs=nnx.Rngs(7)),
        inputs=_images((2, 5, 4)),
        input_names=("batch", "seq", "features"),
        call_kwargs={},
        output_names=("batch", "seq", "features"),
    )


ALL_CASES = (
    gemma_case,
    qwen_case,
    resnet_case,
    vit_case,
    mnist_case,
    scan_case,
    minigpt_case,
    birnn_case,
)
