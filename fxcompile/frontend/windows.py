"""torchvision's Swin windows written out in registry ops while tracing with ``torch.fx``.

torchvision's ``ShiftedWindowAttention`` and ``PatchMerging``/``PatchMergingV2`` call
functions that ``torch.fx.wrap`` keeps as single leaf calls (``shifted_window_attention``,
``_patch_merging_pad``, ``_get_relative_position_bias``): they branch in Python on the input's
height and width, so fx cannot trace through them symbolically.  Given example inputs, the
input shape of each such module is recorded by running the model once (eval mode, no
gradient, the modules' training flags restored), and the tracer writes the module out for that
shape (:func:`decompose`), in the ops every backend runs:

- the zero padding to whole windows (``F.pad``), the cyclic shift (``torch.roll``), the windows
  moved into the batch axis and back (``reshape``/``permute`` with the batch inferred, ``-1``)
  and the padding sliced off;
- the q/k/v projection (the module's own ``qkv`` linear), the heads split
  (``reshape``/``permute`` unbound along the first axis), ``q * d ** -0.5``, ``q @ kᵀ``;
- the relative-position bias, the parameter table gathered by the constant index buffer
  (lowering computes it as constant codes);
- for shifted windows, the attention mask of 0 and −100 for this input size, a constant
  computed here exactly as torchvision computes it, added to the scores;
- softmax, ``@ v``, the heads merged, the module's ``proj`` linear; dropout only where its
  probability is not 0 (``F.dropout`` with the module's training flag).

Patch merging is the padding of an odd height or width, four strided slices, their
concatenation, then the module's ``norm`` and ``reduction`` in the module's order.  Swin V2's
attention (cosine attention with a logit scale) is not written out and stays a leaf call,
which export refuses, naming it.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn

__all__ = ["decomposable_types", "input_shapes", "decompose", "attention_mask"]


def decomposable_types() -> tuple[type, ...]:
    """The module classes :func:`decompose` writes out (empty without torchvision)."""
    try:
        from torchvision.models import swin_transformer as swin
    except ImportError:  # pragma: no cover - torchvision is a dependency of the benchmarks only
        return ()
    return swin.ShiftedWindowAttention, swin.PatchMerging, swin.PatchMergingV2


def _handled(m: nn.Module) -> bool:
    return type(m) in decomposable_types()  # exact: ShiftedWindowAttentionV2 subclasses V1


def input_shapes(model: nn.Module, example_inputs) -> dict[str, tuple[int, ...]]:
    """Qualified name -> input shape of each module :func:`decompose` handles, from one run of
    ``model`` on ``example_inputs`` (a tuple of positional inputs or a dict of keyword ones).
    Empty when the model has no such module or the run fails (the modules then stay as they
    are traced without shapes, and export names what it cannot lower)."""
    names = {m: n for n, m in model.named_modules() if _handled(m)}
    if not names or example_inputs is None:
        return {}
    shapes: dict[str, tuple[int, ...]] = {}

    def record(m, args):
        if args and isinstance(args[0], torch.Tensor):
            shapes.setdefault(names[m], tuple(args[0].shape))

    hooks = [m.register_forward_pre_hook(record) for m in names]
    modes = [(m, m.training) for m in model.modules()]
    args, kwargs = (((), dict(example_inputs)) if isinstance(example_inputs, dict)
                    else (tuple(example_inputs), {}))
    args, kwargs = pytree.tree_map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, (args, kwargs))
    try:
        model.eval()
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception:  # noqa: BLE001 - the model's own error comes again, and better placed, when it is traced
        return {}
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes:
            m.training = mode
    return shapes


def attention_mask(height: int, width: int, window: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor:
    """torchvision's mask for shifted windows of a padded ``height`` x ``width`` map: shape
    ``(1, windows, 1, N, N)`` with N the tokens of a window, 0 where two tokens come from the
    same region before the shift and −100 where not."""
    mask = torch.zeros(height, width)
    count = 0
    for h in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
        for w in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
            mask[h[0]:h[1], w[0]:w[1]] = count
            count += 1
    n = window[0] * window[1]
    mask = mask.view(height // window[0], window[0], width // window[1], window[1]).permute(0, 2, 1, 3).reshape(-1, n)
    mask = mask.unsqueeze(1) - mask.unsqueeze(2)
    mask = torch.where(mask != 0, torch.tensor(-100.0), torch.tensor(0.0))
    return mask.unsqueeze(1).unsqueeze(0)


def _shifted_window_attention(m: nn.Module, x, shape: tuple[int, ...]):
    _, height, width, channels = shape
    wh, ww = m.window_size
    pad_r, pad_b = (ww - width % ww) % ww, (wh - height % wh) % wh
    if pad_r or pad_b:
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    ph, pw = height + pad_b, width + pad_r
    shift = [0 if wh >= ph else m.shift_size[0], 0 if ww >= pw else m.shift_size[1]]
    shifted = sum(shift) > 0
    if shifted:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    n, heads = wh * ww, m.num_heads
    width_head = channels // heads
    x = x.reshape(-1, ph // wh, wh, pw // ww, ww, channels).permute(0, 1, 3, 2, 4, 5).reshape(-1, n, channels)
    qkv = m.qkv(x).reshape(-1, n, 3, heads, width_head).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q = q * width_head ** -0.5
    attn = q.matmul(k.transpose(-2, -1))
    bias = m.relative_position_bias_table[m.relative_position_index]
    attn = attn + bias.view(n, n, -1).permute(2, 0, 1).contiguous().unsqueeze(0)
    if shifted:
        windows = (ph // wh) * (pw // ww)
        attn = attn.view(-1, windows, heads, n, n) + attention_mask(ph, pw, (wh, ww), shift)
        attn = attn.view(-1, heads, n, n)
    attn = F.softmax(attn, dim=-1)
    if m.attention_dropout:
        attn = F.dropout(attn, p=m.attention_dropout, training=m.training)
    x = attn.matmul(v).transpose(1, 2).reshape(-1, n, channels)
    x = m.proj(x)
    if m.dropout:
        x = F.dropout(x, p=m.dropout, training=m.training)
    x = x.reshape(-1, ph // wh, pw // ww, wh, ww, channels).permute(0, 1, 3, 2, 4, 5).reshape(-1, ph, pw, channels)
    if shifted:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    if pad_r or pad_b:
        x = x[:, :height, :width, :].contiguous()
    return x


def _patch_merging(m: nn.Module, x, shape: tuple[int, ...]):
    height, width = shape[-3], shape[-2]
    if height % 2 or width % 2:
        x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
    x = torch.cat([x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :], x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]], -1)
    from torchvision.models.swin_transformer import PatchMergingV2
    if type(m) is PatchMergingV2:
        return m.norm(m.reduction(x))
    return m.reduction(m.norm(x))


def decompose(m: nn.Module, x: fx.Proxy, shape: tuple[int, ...]):
    """The module ``m`` (one of :func:`decomposable_types`) applied to ``x`` of ``shape``
    (the batch size stays free), in registry ops."""
    from torchvision.models.swin_transformer import ShiftedWindowAttention
    if type(m) is ShiftedWindowAttention:
        return _shifted_window_attention(m, x, shape)
    return _patch_merging(m, x, shape)
