"""Small building blocks shared by attention, experts and MTP: dense projections (optionally FP8), RMSNorm,
the token embedding, SwiGLU.

Every parameter carries ``logical_axes`` metadata (names such as "embed", "mlp", "heads"), which
``sharding.rules`` maps to mesh axes; a stack of layers adds a leading "layers" axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.fp8_gemm.vjp import FP8Recipe, fp8_linear


class Dense(nnx.Module):
    """A bias-free projection ``x @ kernel`` with an fp32 master ``kernel`` [in, out].

    The matmul runs in ``dtype`` (float32 or bfloat16), or, with an ``fp8`` recipe, as DeepSeek-V3's FP8 GEMMs
    (1x128 activation and 128x128 weight scaling in the recipe's forward, dgrad and wgrad;
    ``pallas_kernels.fp8_gemm``).
    """

    def __init__(self, in_features: int, out_features: int, *, axes: tuple[str, str], dtype, init_std: float,
                 fp8: FP8Recipe | None, rngs: nnx.Rngs):
        self.kernel = nnx.Param(nnx.initializers.normal(init_std)(rngs.params(), (in_features, out_features),
                                                                  jnp.float32), logical_axes=axes)
        self.dtype = dtype
        self.fp8 = fp8

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., in] -> [..., out] in ``dtype``."""
        x = x.astype(self.dtype)
        if self.fp8 is not None:
            return fp8_linear(x, self.kernel[...].T, None, self.fp8)
        return x @ self.kernel[...].astype(self.dtype)


def linear(in_features: int, out_features: int, *, axes: tuple[str, str], dtype, init_std: float, rngs: nnx.Rngs,
           fp8: FP8Recipe | None = None) -> Dense:
    """A ``Dense`` [in, out] whose kernel's dimensions are named ``axes`` (logical axis names)."""
    return Dense(in_features, out_features, axes=axes, dtype=dtype, init_std=init_std, fp8=fp8, rngs=rngs)


def rms_norm(features: int, *, eps: float, dtype, rngs: nnx.Rngs, axis: str = "norm") -> nnx.RMSNorm:
    """RMSNorm over the last dimension; its fp32 ``scale`` [features] is named ``axis``."""
    norm = nnx.RMSNorm(features, epsilon=eps, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    norm.scale.set_metadata(logical_axes=(axis,))
    return norm


def embedding(vocab_size: int, features: int, *, dtype, init_std: float, rngs: nnx.Rngs) -> nnx.Embed:
    """The token embedding: an fp32 table [vocab, features] drawn from N(0, init_std^2)."""
    embed = nnx.Embed(vocab_size, features, dtype=dtype, param_dtype=jnp.float32,
                      embedding_init=nnx.initializers.normal(init_std), rngs=rngs)
    embed.embedding.set_metadata(logical_axes=("vocab", "embed"))
    return embed


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) * up(x)): the dense FFN and the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, dtype, init_std: float, rngs: nnx.Rngs,
                 fp8: FP8Recipe | None = None):
        dense = dict(dtype=dtype, init_std=init_std, fp8=fp8, rngs=rngs)
        self.gate_proj = linear(hidden_size, intermediate_size, axes=("embed", "mlp"), **dense)
        self.up_proj = linear(hidden_size, intermediate_size, axes=("embed", "mlp"), **dense)
        self.down_proj = linear(intermediate_size, hidden_size, axes=("mlp", "embed"), **dense)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., hidden] -> [..., hidden]."""
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
