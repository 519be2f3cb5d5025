"""Attention written out in registry ops while tracing with ``torch.fx``.

``nn.MultiheadAttention`` is otherwise a leaf (computed in float inside, quantized at its
boundary) and ``F.scaled_dot_product_attention`` one opaque call; neither deploys.  Traced
through :func:`decomposed_attention`, both become the ops every backend runs: the q/k/v
projections (``linear``), the heads split off (``reshape``, ``transpose``), the scores
``q @ kᵀ`` (``matmul``) times the scale ``1/√d`` (a constant multiply, a moved binary point
when ``d`` is a power of four), ``softmax`` over the last dim, ``@ v`` and the heads merged
back, then the output projection.  Only the cases that are exactly these ops are written
out: self-attention (query, key and value one tensor) of ``batch_first`` modules with one
packed input projection, no masks, no bias_k/bias_v or zero attention, no dropout while
training, ``need_weights=False``; ``scaled_dot_product_attention`` without mask, dropout,
causality or grouped-query attention.  Anything else keeps its float form, and export says
which node it is.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = ["inverse_sqrt", "multi_head_attention", "decomposable", "decomposed_attention"]


def inverse_sqrt(n):
    """``1/√n`` of a size (the attention scale of a head width read from a shape at trace time)."""
    return 1.0 / math.sqrt(n)


fx.wrap("inverse_sqrt")  # traced as one call on sizes; lowering evaluates it for the example shape

_SDPA = F.scaled_dot_product_attention


def _attention(q, k, v, scale):
    # (B, H, T, D) each: softmax(q kᵀ · scale) v
    scores = (q @ k.transpose(-2, -1)) * scale
    return scores.softmax(dim=-1) @ v


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if attn_mask is not None or dropout_p or is_causal or enable_gqa:
        return _SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                     enable_gqa=enable_gqa)
    return _attention(query, key, value, inverse_sqrt(query.shape[-1]) if scale is None else scale)


def decomposable(m: nn.MultiheadAttention, query, key, value, key_padding_mask=None, need_weights=True,
                 attn_mask=None, average_attn_weights=True, is_causal=False) -> bool:
    """Whether the call ``m(query, key, value, ...)`` is self-attention that
    :func:`multi_head_attention` writes out (see the module docstring)."""
    return (query is key is value and key_padding_mask is None and attn_mask is None and not is_causal
            and not need_weights and m.batch_first and m._qkv_same_embed_dim and m.bias_k is None
            and m.bias_v is None and not m.add_zero_attn and (m.dropout == 0 or not m.training))


def multi_head_attention(m: nn.MultiheadAttention, x, *args, **kwargs):
    """``m(x, x, x, need_weights=False)`` of a ``batch_first`` module, in registry ops: returns
    ``(output, None)`` as the module does."""
    b, t, d = x.shape
    heads, width = m.num_heads, m.head_dim
    qkv = F.linear(x, m.in_proj_weight, m.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (qkv[i].reshape(b, t, heads, width).transpose(1, 2) for i in range(3))
    out = _attention(q, k, v, 1.0 / math.sqrt(width)).transpose(1, 2).reshape(b, t, d)
    return F.linear(out, m.out_proj.weight, m.out_proj.bias), None


@contextlib.contextmanager
def decomposed_attention():
    """While tracing: ``F.scaled_dot_product_attention`` written out (where decomposable)."""
    F.scaled_dot_product_attention = _sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = _SDPA
