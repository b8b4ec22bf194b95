"""Cross-attention interaction for the CrossBlock U-Net, the per-level plan, and its cost model.

An attention CrossBlock (:class:`AttnCrossBlock`) keeps v1's two streams and its pairwise conv,
and adds a global, content-based read of the support for the query:

* ``a = CrossAttention(u, {v_i})``: every query token attends over the tokens of *all* S
  support examples at once (one softmax over ``S * h' * w'`` keys), multi-head, through
  ``F.scaled_dot_product_attention``. Keys and values come from the support features (image
  and label at the first level, features that carry both deeper), average-pooled by ``pool``.
* ``z_i = Conv3x3([u ; a ; v_i])``, computed as v1's ``Conv([u ; v_i]) + W_a * a``: the
  per-example conv of v1, whose query input is the query *and* what it read by attention.
* ``u' = ConvOp_q(mean_i z_i)``, ``v_i' = ConvOp_s(z_i)``, as in v1. So the support stream is
  updated by a per-example conv of [attended query ; support], and gets the query's attention
  readout pixel-aligned, the way v1 gives it the query.

Positions: a fixed 2D sin/cos code of each token's centre in image-normalized coordinates
(the same frame at every level and for pooled grids), mapped by learned linear maps and added
to queries and keys (not values). The net can learn v1's "same place in the support" prior as
well as content matching. There is no per-example index code: the keys are a set, so the
output does not depend on the order of the support examples. Queries and keys are
LayerNorm-ed per head (QK-norm), as the unnormalized U-Net's features grow with depth.

With ``W_a = 0`` the block computes exactly v1's CrossBlock with the same cross/target/support
weights, whose state-dict names it keeps (``cross.cross_conv``, ``target.vmapped.conv``,
``support.vmapped.conv``); the attention adds ``attn.*``.

Cost model (one query, inference, fast path): :func:`network_cost`; see docs/attention.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megaseg.models.blocks import CrossBlock, vmap

INTERACTIONS = ("conv", "attn")
POS_FREQS = 8  # frequencies pi * 2^k, k < 8: periods from 2 images down to 1/64 of the image
POS_DIM = 4 * POS_FREQS  # (sin, cos) x (y, x)


def sincos_2d(h: int, w: int, *, device=None, dtype=None) -> Tensor:
    """Fixed position code of the ``h x w`` cell centres -> ``(h * w, POS_DIM)``, row-major.

    Coordinates are ``(i + 0.5) / h`` in [0, 1], so a level and its pooled grid, and every
    resolution, share one frame: a pooled cell gets the code of its centre.
    """
    freqs = math.pi * 2.0 ** torch.arange(POS_FREQS, device=device, dtype=dtype)

    def code(n: int) -> Tensor:  # (n, 2 * POS_FREQS)
        angle = ((torch.arange(n, device=device, dtype=dtype) + 0.5) / n)[:, None] * freqs
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    cy, cx = code(h), code(w)
    grid = torch.cat([cy[:, None].expand(h, w, -1), cx[None].expand(h, w, -1)], dim=2)
    return grid.reshape(h * w, POS_DIM)


class CrossAttention(nn.Module):
    """Query tokens attend over the tokens of all support examples.

    ``u (B, Cq, h, w)``, ``v (Bs, S, Cs, h, w)`` with ``Bs`` in {1, B} -> ``(B, C_out, h, w)``.
    Queries: one token per pixel of ``u``. Keys/values: ``v`` average-pooled by ``pool``
    (``h/pool x w/pool`` tokens per example), ``S * h * w / pool**2`` in all. A shared support
    set (``Bs == 1``) is not copied per query: the B queries' tokens are folded into one
    sequence that attends to the one key set (exact, each query token attends on its own).

    Args:
        query_channels, support_channels: Cq, Cs.
        width: C, the query / key / value features (split over ``heads``).
        out_channels: of ``out``, the 3x3 conv applied to the attended values.
        heads: attention heads; ``width % heads == 0``.
        pool: key/value pooling factor; h and w must be divisible by it.
    """

    def __init__(
        self,
        query_channels: int,
        support_channels: int,
        width: int,
        out_channels: int,
        heads: int = 4,
        pool: int = 1,
    ):
        super().__init__()
        if width % heads:
            raise ValueError(f"attention width {width} is not divisible by heads={heads}")
        if pool < 1:
            raise ValueError(f"attention pool must be >= 1, got {pool}")
        self.heads, self.pool = heads, pool
        self.to_q = nn.Linear(query_channels, width)
        self.to_k = nn.Linear(support_channels, width)
        self.to_v = nn.Linear(support_channels, width)
        # QK-norm (per head): the U-Net has no norm layers and its features grow with depth;
        # without it the deepest blocks' scores had std ~ 4000 at init (a hard argmax). Norming
        # the projections, not the inputs, keeps the first level's 1-channel query image and
        # image/label pair intact (a LayerNorm over one channel outputs a constant).
        self.norm_q = nn.LayerNorm(width // heads)
        self.norm_k = nn.LayerNorm(width // heads)
        self.pos_q = nn.Linear(POS_DIM, width, bias=False)
        self.pos_k = nn.Linear(POS_DIM, width, bias=False)
        # No bias: the cross-conv this output is added to has one.
        self.out = nn.Conv2d(width, out_channels, 3, padding=1, bias=False)

    def _heads(self, x: Tensor) -> Tensor:
        """``(..., L, C)`` -> ``(..., heads, L, C / heads)``."""
        return x.unflatten(-1, (self.heads, -1)).transpose(-3, -2)

    def forward(self, u: Tensor, v: Tensor) -> Tensor:
        B, _, h, w = u.shape
        Bs, S = v.shape[:2]
        p = self.pool
        if h % p or w % p:
            raise ValueError(f"attention pool {p} does not divide the level size {h}x{w}")
        if Bs not in (1, B):
            raise ValueError(f"support batch {Bs} must be 1 or the query batch {B}")
        if p > 1:
            v = vmap(lambda x: F.avg_pool2d(x, p), v)
        hk, wk = h // p, w // p
        pos_q = self._heads(self.pos_q(sincos_2d(h, w, device=u.device, dtype=u.dtype)))
        pos_k = self._heads(self.pos_k(sincos_2d(hk, wk, device=u.device, dtype=u.dtype)))

        q = self._heads(self.to_q(u.flatten(2).transpose(1, 2)))  # (B, heads, h*w, d)
        q = self.norm_q(q) + pos_q
        s = v.flatten(3).transpose(2, 3)  # (Bs, S, hk*wk, Cs) support tokens
        k = self.norm_k(self._heads(self.to_k(s))) + pos_k  # (Bs, S, heads, hk*wk, d)
        val = self._heads(self.to_v(s))
        # One set of S*hk*wk keys per support set: (Bs, heads, S*hk*wk, d).
        k, val = (x.transpose(1, 2).flatten(2, 3) for x in (k, val))
        if Bs == 1:  # fold the queries into one sequence against the shared keys
            q = q.transpose(0, 1).reshape(1, self.heads, B * h * w, -1)
        a = F.scaled_dot_product_attention(q, k, val)
        if Bs == 1:
            a = a.reshape(self.heads, B, h * w, -1).transpose(0, 1)
        return self.out(a.transpose(2, 3).reshape(B, -1, h, w))  # a: (B, heads, h*w, d)


class AttnCrossBlock(CrossBlock):
    """CrossBlock whose query also reads the whole support set by cross-attention.

    ``a = CrossAttention(u, {v_i})``, ``z_i = Conv([u ; v_i]) + W_a * a``,
    ``u' = ConvOp_q(mean_i z_i)``, ``v_i' = ConvOp_s(z_i)``; shapes as :class:`CrossBlock`.
    ``heads`` and ``pool`` go to :class:`CrossAttention` (width = the block's width).
    """

    def __init__(
        self,
        query_channels: int,
        support_channels: int,
        width: int,
        cross_act: str | None = None,
        act: str = "leaky_relu",
        norm_groups: int | None = None,
        heads: int = 4,
        pool: int = 1,
    ):
        super().__init__(query_channels, support_channels, width, cross_act, act, norm_groups)
        self.attn = CrossAttention(query_channels, support_channels, width, width, heads, pool)

    def query_context(self, u: Tensor, v: Tensor) -> Tensor:
        """``W_a * CrossAttention(u, v)``: ``(B, C, h, w)``."""
        return self.attn(u, v)


def make_cross_block(
    kind: str,
    query_channels: int,
    support_channels: int,
    width: int,
    *,
    heads: int = 4,
    pool: int = 1,
    **block,
) -> CrossBlock:
    """``"conv"``: v1's :class:`CrossBlock`; ``"attn"``: :class:`AttnCrossBlock`."""
    if kind == "conv":
        return CrossBlock(query_channels, support_channels, width, **block)
    if kind == "attn":
        return AttnCrossBlock(
            query_channels, support_channels, width, heads=heads, pool=pool, **block
        )
    raise ValueError(f"unknown interaction {kind!r}; choose from {INTERACTIONS}")


def interaction_plan(
    depth: int,
    interactions: Sequence[str] | None,
    decoder_interactions: Sequence[str] | None,
    attn_pool: int | Sequence[int],
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """``(kind, pool)`` per encoder level (finest first) and per decoder block (deepest first).

    ``interactions``: one kind per encoder level (default all "conv"). ``decoder_interactions``:
    one per decoder block, deepest first; default: mirrored, i.e. the encoder's kind at the same
    resolution. ``attn_pool``: key/value pooling per encoder level (or one int for all); a
    decoder block uses the pooling of the encoder level at its resolution.
    """
    enc = list(interactions) if interactions is not None else ["conv"] * depth
    if len(enc) != depth:
        raise ValueError(f"interactions needs {depth} entries (one per encoder level), got {enc}")
    dec = list(decoder_interactions) if decoder_interactions is not None else enc[-2::-1]
    if len(dec) != depth - 1:
        raise ValueError(f"decoder_interactions needs {depth - 1} entries, got {dec}")
    for kind in enc + dec:
        if kind not in INTERACTIONS:
            raise ValueError(f"unknown interaction {kind!r}; choose from {INTERACTIONS}")
    pools = [attn_pool] * depth if isinstance(attn_pool, int) else list(attn_pool)
    if len(pools) != depth or any(int(p) < 1 for p in pools):
        raise ValueError(f"attn_pool needs one factor >= 1 per encoder level, got {attn_pool}")
    pools = [int(p) for p in pools]
    levels = range(depth - 2, -1, -1)  # decoder block j runs at encoder level depth - 2 - j
    return list(zip(enc, pools, strict=True)), [
        (k, pools[lv]) for k, lv in zip(dec, levels, strict=True)
    ]


# -- cost model ---------------------------------------------------------------------------------


@dataclass
class BlockCost:
    """Work and memory of one block for one query (inference, fast path).

    ``conv_macs``: multiply-accumulates of the convs and linear maps (what ``FlopCounterMode``
    counts); ``attn_macs``: those of the scores and the weighted sum inside
    ``scaled_dot_product_attention``, ``2 * n * S * m * C``; ``traffic_elements``: elements
    of support-sized tensors read and written by the memory-bound ops (broadcast add, support
    mean, activation, pooling, upsampling, concatenation); ``peak_elements``: the largest
    number of support-sized tensor elements alive while the block runs (skips included).
    """

    name: str
    kind: str
    size: tuple[int, int]
    keys: int  # S * m, the key/value tokens per query token (0 for conv)
    conv_macs: int
    attn_macs: int
    traffic_elements: int
    peak_elements: int


def conv_transient(inp: int, out: int) -> int:
    """Elements a CPU conv holds while it runs: its output plus a reorder copy the size of the
    larger of input and output (oneDNN's blocked layout; measured with the allocator)."""
    return out + max(inp, out)


def network_cost(model: nn.Module, S: int, H: int, W: int) -> list[BlockCost]:
    """Cost model of a :class:`~megaseg.models.UniverSeg` for one query ``(1,1,H,W)``, S supports,
    following the fast path in inference.

    Per block at level size ``h x w`` (``n = h w``, ``m = n / pool**2``), cross-conv
    ``Cq + Cs -> C``, 3x3 convs (K = 9):

    * conv: ``K Cq C n`` (query term) + ``K Cs C n S`` (support term) + ``K C^2 n`` (query
      conv) + ``K C^2 n S`` (support conv). Where the block's query input comes from the mean of
      a narrower support (``Cs < C``, linear cross-conv: the first block), ``K (Cq + Cs) C n``
      more for ``W_q u + W_s mean_i v_i``. The last decoder block has no support conv and one
      support-term conv of the averaged support (S = 1 in its terms) when it reads only the
      support mean (v1's last block; not an attention block).
    * attention adds ``Cq C n + 2 Cs C S m + POS_DIM C (n + m)`` (projections), ``K C^2 n``
      (``out``) and ``2 n S m C`` (scores and weighted sum).
    * memory-bound traffic, elements read + written over support-sized tensors: ``2 S C n``
      (the query term added in place to the support term), the support mean (``S C n``, or
      ``S Cs n`` from the narrower input), ``2 S C n`` (the support activation, in place),
      ``1.25 S C n`` (2x max-pool without indices) after an encoder block; before a decoder
      block ``1.25 S Cp n`` (upsampling of the ``Cp``-channel stream below) and ``2 S Cs n``
      (concatenation), or for a mean-only last block just the two means (``S Cp n / 4 + S Cs'
      n``). Attention: ``S Cs n`` (pooling) and ``~4 S C m`` (token copies).

    Memory counts the support-sized tensors alive at once (query-sized ones are ``1/S`` of them
    and ignored): the skips still held, the block input, the cross-conv output ``z`` and the
    support conv's output (activated in place), and while a conv runs on the CPU a reorder copy
    the size of the larger of its input and output (:func:`conv_transient`); before a decoder
    block the stream below, its upsampled copy and the concatenation; during pooling its input
    and two half-done maps. The
    attention adds its pooled input and its key and value tokens (``~4 S C m`` with the copies
    the reshapes make); the kernels used on CPU and CUDA (flash / memory-efficient) never hold
    the ``n x S m`` score matrix. Bytes = elements x the element size.
    """
    blocks = [("enc", i, b) for i, b in enumerate(model.enc_blocks)]
    blocks += [("dec", j, b) for j, b in enumerate(model.dec_blocks)]
    depth = len(model.enc_blocks)
    costs: list[BlockCost] = []
    skips: list[int] = []  # elements of the support skips held, finest first
    v_prev = 0  # elements of the support stream coming out of the previous block
    for part, i, block in blocks:
        level = i if part == "enc" else depth - 2 - i
        h, w = H >> level, W >> level
        n = h * w
        C, cin = block.cross.cross_conv.weight.shape[:2]
        Cq = block.cross.query_channels
        Cs = cin - Cq
        last = part == "dec" and i == len(model.dec_blocks) - 1
        mean_only = last and block.reads_support_mean_only
        linear = block.cross.is_linear
        if part == "dec":
            skip = skips.pop()  # still referenced while this block runs
            up = v_prev * 4  # the stream below, upsampled to this level
        held = sum(skips)
        v_in, z = S * Cs * n, S * C * n
        if mean_only:
            # the support is averaged before upsampling and concatenation: nothing S-sized
            conv = 9 * C * n * (Cq + Cs + C)
            traffic = v_prev + skip
            work = held + skip + v_prev
        else:
            if last and linear:  # no support output: W_q u + W_s mean_i v_i, no z
                conv = 9 * C * n * (Cq + Cs + C)
                traffic = v_in
                work = held + v_in
            else:  # z for all S; its mean from the narrower input where that is exact
                narrow_mean = linear and Cs < C
                conv = 9 * C * n * (Cq + Cs * S + C + (0 if last else C * S))
                conv += 9 * C * n * (Cq + Cs) if narrow_mean else 0
                traffic = (v_in if narrow_mean else z) + 2 * z + (0 if last else 2 * z)
                # the support-term conv, then (not last) the support conv next to z
                work = held + v_in + max(conv_transient(v_in, z), 0 if last else 3 * z)
            if part == "dec":
                traffic += 5 * up // 4 + 2 * v_in
                work = max(held + skip + v_prev + up + v_in, work + skip)
        attn = keys = 0
        if isinstance(block, AttnCrossBlock):
            m = n // block.attn.pool**2
            keys = S * m
            conv += Cq * C * n + 2 * Cs * C * S * m + POS_DIM * C * (n + m) + 9 * C * C * n
            attn = 2 * n * S * m * C
            attn_mem = S * m * ((Cs if block.attn.pool > 1 else 0) + 4 * C)
            traffic += (S * Cs * n if block.attn.pool > 1 else 0) + 4 * S * C * m
            work = max(work, held + (skip if part == "dec" else 0) + S * Cs * n + attn_mem)
        v_out = S * C * n
        if part == "enc" and level < depth - 1:
            traffic += 5 * v_out // 4
            work = max(work, held + v_out + 3 * v_out // 4)  # pooling: skip + 2 halves + out
        kind = "attn" if keys else "conv"
        costs.append(BlockCost(f"{part}{i}", kind, (h, w), keys, conv, attn, traffic, work))
        v_prev = v_out
        if part == "enc" and level < depth - 1:
            skips.append(v_prev)
            v_prev //= 4  # the downsampled stream is the next block's input
    return costs


def total_cost(model: nn.Module, S: int, H: int, W: int) -> dict[str, float]:
    """``network_cost`` summed: conv / attention / total MACs (plus ``out_conv``), traffic and
    peak elements."""
    costs = network_cost(model, S, H, W)
    out = model.out_conv.conv
    conv = sum(c.conv_macs for c in costs) + out.in_channels * out.out_channels * H * W
    attn = sum(c.attn_macs for c in costs)
    return {
        "conv_macs": conv,
        "attn_macs": attn,
        "macs": conv + attn,
        "traffic_elements": sum(c.traffic_elements for c in costs),
        "peak_elements": max(c.peak_elements for c in costs),
    }
