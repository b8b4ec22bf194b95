"""Building blocks of the CrossBlock U-Net: the support-axis helper, conv ops and the CrossBlock.

Conventions: a query tensor is ``(B, C, H, W)``; a support tensor keeps its support axis
explicit, ``(Bs, S, C, H, W)`` with ``Bs`` equal to ``B`` or 1 (one support set shared by all
queries of the batch, broadcast where it meets the query).

Each CrossBlock has two forward paths that give the same numbers:

* ``naive``: the published formulation. The query is repeated S times, concatenated with
  each support example on the channel axis and one batched conv runs over the B*S pairs.
* ``fast``: the cross-conv weight is split on its input channels, ``W = [W_q | W_s]``, so
  ``W * [u ; v_i] = W_q * u + W_s * v_i``: the query term is computed once per query. When
  only the query output of a block is needed (the last decoder block) and the cross-conv is
  linear with no norm, ``mean_i(W_s * v_i) = W_s * mean_i(v_i)``: one conv of the averaged
  support replaces S of them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers import get_act_layer
from torch import Tensor, nn


def vmap(module: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Apply a ``(N, C, H, W) -> (N, C', H', W')`` module over every leading axis of ``x``.

    ``x (*lead, C, H, W)`` is folded to ``(prod(lead), C, H, W)``, ``module`` is applied and the
    result is unfolded to ``(*lead, C', H', W')``. With a 4-D ``x`` this is ``module(x)``.
    """
    lead = x.shape[:-3]
    y = module(x.reshape(-1, *x.shape[-3:]))
    return y.reshape(*lead, *y.shape[1:])


def support_mean(x: Tensor) -> Tensor:
    """``x (B, S, C, H, W)`` -> ``(B, C, H, W)``, the mean over the support axis.

    Channels-last maps (``Segmenter`` on the CPU, oneDNN's layout) stay channels-last:
    ``Tensor.mean`` writes them NCHW (2.6x slower, and the next conv reorders them back).
    """
    if x.stride(2) == 1 and x.shape[2] > 1:  # channels innermost
        return x.permute(0, 1, 3, 4, 2).mean(dim=1).permute(0, 3, 1, 2)
    return x.mean(dim=1)


class Vmap(nn.Module):
    """Wraps a module so it maps over the leading (batch, support) axes; see :func:`vmap`."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.vmapped = module

    def forward(self, x: Tensor) -> Tensor:
        return vmap(self.vmapped, x)


class MaxPool2x2(nn.MaxPool2d):
    """``nn.MaxPool2d(2)``; without autograd, the max of the four strided 2x2 views instead.

    Same values (a max is exact). On CPU ``max_pool2d`` also writes int64 argmax indices, which
    autograd needs and inference does not: the views form reads the input once and writes only
    the output, ~3x faster on a ``(64, 64, 128, 128)`` support tensor (2 threads). With autograd
    on (training) the layer is ``max_pool2d`` itself, gradients included.
    """

    def __init__(self):
        super().__init__(2)

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() or x.shape[-1] % 2 or x.shape[-2] % 2:
            return super().forward(x)
        top, bottom = x[..., 0::2, :], x[..., 1::2, :]
        return torch.maximum(
            torch.maximum(top[..., 0::2], top[..., 1::2]),
            torch.maximum(bottom[..., 0::2], bottom[..., 1::2]),
        )


def _norm(groups: int | None, channels: int) -> nn.Module | None:
    if groups is None:
        return None
    if channels % groups:
        raise ValueError(f"norm_groups={groups} does not divide {channels} channels")
    return nn.GroupNorm(groups, channels)


def _act(name: str | None, inplace: bool = False) -> nn.Module | None:
    return None if name is None else get_act_layer(name)(inplace=inplace)


class ConvOp(nn.Module):
    """Conv (with bias, "same" padding) -> optional GroupNorm -> activation, on ``(N, C, H, W)``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        act: str | None = "leaky_relu",
        norm_groups: int | None = None,
        kernel_size: int = 3,
    ):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.norm = _norm(norm_groups, out_channels)
        # In place: it acts on this op's own conv / norm output, which their backward does not use.
        self.act = _act(act, inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        return x if self.act is None else self.act(x)


class CrossConv2d(nn.Module):
    """``z_i = post(Conv([u ; v_i]) + c)`` for a query ``u`` and each support example ``v_i``.

    The conv's input channels are the query's first, then the support's (the public v1 weight
    layout). ``post`` is an optional GroupNorm then an optional nonlinearity; v1 has neither.
    ``c (B, C, H, W)`` is an optional query-side context term shared by all pairs (an attention
    block's readout, see ``megaseg.models.attention``); v1 has none.
    """

    def __init__(
        self,
        query_channels: int,
        support_channels: int,
        out_channels: int,
        act: str | None = None,
        norm_groups: int | None = None,
    ):
        super().__init__()
        self.query_channels = query_channels
        self.cross_conv = nn.Conv2d(
            query_channels + support_channels, out_channels, kernel_size=3, padding=1
        )
        self.norm = _norm(norm_groups, out_channels)
        self.act = _act(act)

    @property
    def is_linear(self) -> bool:
        """True when ``z_i`` is affine in ``v_i``, so its support mean commutes with the conv."""
        return self.norm is None and self.act is None

    def post(self, z: Tensor) -> Tensor:
        """Norm and nonlinearity on ``z (*lead, C, H, W)``."""
        if self.norm is not None:
            z = vmap(self.norm, z)
        return z if self.act is None else self.act(z)

    def naive(self, u: Tensor, v: Tensor, context: Tensor | None = None) -> Tensor:
        """Published form. ``u (B, Cq, H, W)``, ``v (Bs, S, Cs, H, W)`` -> ``z (B, S, C, H, W)``."""
        B, S = u.shape[0], v.shape[1]
        v = v.expand(B, *v.shape[1:])
        pairs = torch.cat([u[:, None].expand(B, S, *u.shape[1:]), v], dim=2)
        z = vmap(self.cross_conv, pairs)
        return self.post(z if context is None else z + context[:, None])

    def query_term(self, u: Tensor, context: Tensor | None = None) -> Tensor:
        """``W_q * u + b (+ c)``: ``u (B, Cq, H, W)`` -> ``(B, C, H, W)``, once per query."""
        w_q = self.cross_conv.weight[:, : self.query_channels]
        term = F.conv2d(u, w_q, self.cross_conv.bias, padding=1)
        return term if context is None else term + context

    def support_term(self, v: Tensor) -> Tensor:
        """``W_s * v_i`` (no bias): ``v (*lead, Cs, H, W)`` -> ``(*lead, C, H, W)``."""
        w_s = self.cross_conv.weight[:, self.query_channels :]
        return vmap(lambda x: F.conv2d(x, w_s, padding=1), v)

    def fast(
        self,
        u: Tensor,
        v: Tensor | None = None,
        support_term: Tensor | None = None,
        context: Tensor | None = None,
    ) -> Tensor:
        """Split form of :meth:`naive`; ``support_term`` may be a cached ``support_term(v)``."""
        query_term = self.query_term(u, context)[:, None]
        if support_term is None:
            support_term = self.support_term(v)
            if support_term.shape[0] == query_term.shape[0]:
                # Made here, so overwritten with z: one pass less over (B, S, C, H, W).
                return self.post(support_term.add_(query_term))
        return self.post(query_term + support_term)

    def fast_mean(self, u: Tensor, v: Tensor, context: Tensor | None = None) -> Tensor:
        """``mean_i z_i`` as one conv of the averaged support; exact only if :attr:`is_linear`.

        ``u (B, Cq, H, W)``, ``v (Bs, S, Cs, H, W)`` -> ``(B, C, H, W)``.
        """
        return self.query_term(u, context) + self.support_term(support_mean(v))


class CrossBlock(nn.Module):
    """One level of the U-Net: cross-conv, then separate query and support conv branches.

    ``u' = ConvOp_q(mean_i z_i)``, ``v_i' = ConvOp_s(z_i)`` with ``z_i = CrossConv(u, v_i)``.
    Subclasses change the interaction by returning a query-side context from
    :meth:`query_context` (``megaseg.models.attention.AttnCrossBlock``).
    """

    def __init__(
        self,
        query_channels: int,
        support_channels: int,
        width: int,
        cross_act: str | None = None,
        act: str = "leaky_relu",
        norm_groups: int | None = None,
    ):
        super().__init__()
        self.cross = CrossConv2d(query_channels, support_channels, width, cross_act, norm_groups)
        self.target = Vmap(ConvOp(width, width, act, norm_groups))
        self.support = Vmap(ConvOp(width, width, act, norm_groups))

    def query_context(self, u: Tensor, v: Tensor) -> Tensor | None:
        """Extra query-side term ``(B, C, H, W)`` of the cross-conv, or None (v1)."""
        return None

    @property
    def reads_support_mean_only(self) -> bool:
        """True when, without its support output, the block needs only ``mean_i v_i``.

        Then a caller may average the support before linear ops it applies to each ``v_i``
        (upsampling, concatenation) and pass ``v (B, 1, C, H, W)``: the same result, less work.
        """
        return self.cross.is_linear and type(self).query_context is CrossBlock.query_context

    def forward(
        self,
        u: Tensor,
        v: Tensor,
        *,
        fast: bool = True,
        need_support: bool = True,
        support_term: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """``u (B, Cq, H, W)``, ``v (Bs, S, Cs, H, W)`` -> ``(u' (B, C, H, W), v' (B, S, C, H, W))``.

        ``need_support=False`` skips the support branch (``v'`` is None). ``support_term`` is a
        cached ``self.cross.support_term(v)`` for the fast path.
        """
        context = self.query_context(u, v)
        if not fast:
            z = self.cross.naive(u, v, context)
            return self.target(support_mean(z)), self.support(z)
        if not need_support and self.cross.is_linear and support_term is None:
            return self.target(self.cross.fast_mean(u, v, context)), None
        z = self.cross.fast(u, v, support_term, context)
        if self.cross.is_linear and v.shape[2] < z.shape[2]:
            # mean_i z_i from the narrower input (the first block: 2 channels in, 64 out):
            # one conv of mean_i v_i instead of a mean over S wide maps.
            mean = self.cross.fast_mean(u, v, context)
        else:
            mean = support_mean(z)
        return self.target(mean), (self.support(z) if need_support else None)
