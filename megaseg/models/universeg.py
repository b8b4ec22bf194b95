"""The CrossBlock U-Net (UniverSeg v1 and its variants), its init and its builders."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from megaseg.models.attention import interaction_plan, make_cross_block
from megaseg.models.blocks import ConvOp, MaxPool2x2, support_mean, vmap
from megaseg.models.registry import register_model


class UniverSeg(nn.Module):
    """In-context segmentation network: a query image and a labelled support set -> logits.

    ``forward(query (B,1,H,W), support_images (Bs,S,1,H,W), support_labels (Bs,S,1,H,W))``
    returns logits ``(B,1,H,W)`` (no activation), with ``Bs`` equal to ``B`` or 1 (one support
    set shared by every query). H and W must be divisible by ``2 ** (depth - 1)``.

    Args:
        encoder_widths: features of each encoder level; its length is the depth.
        decoder_widths: features of each decoder level, deepest first; defaults to the
            encoder's, reversed, without the bottleneck (v1: 64, 64, 64).
        cross_act: nonlinearity after the cross-conv (timm name); None in v1.
        act: nonlinearity of the query / support conv branches.
        norm_groups: GroupNorm groups after every conv, None (v1) for no normalization.
        fast: default forward path; ``forward(..., fast=False)`` runs the published one.
        interactions: per encoder level, "conv" (v1's cross-conv, the default) or "attn"
            (cross-attention, ``megaseg.models.attention``), e.g. ("conv", "conv", "attn", "attn").
        decoder_interactions: per decoder block, deepest first; default: mirrored (the
            encoder's kind at the same resolution).
        attn_heads: heads of every attention block.
        attn_pool: key/value average-pooling factor per encoder level (or one for all); a
            decoder block uses that of its resolution.
    """

    def __init__(
        self,
        encoder_widths: Sequence[int] = (64, 64, 64, 64),
        decoder_widths: Sequence[int] | None = None,
        cross_act: str | None = None,
        act: str = "leaky_relu",
        norm_groups: int | None = None,
        fast: bool = True,
        interactions: Sequence[str] | None = None,
        decoder_interactions: Sequence[str] | None = None,
        attn_heads: int = 4,
        attn_pool: int | Sequence[int] = 1,
    ):
        super().__init__()
        encoder_widths = list(encoder_widths)
        if decoder_widths is None:
            decoder_widths = encoder_widths[-2::-1]
        decoder_widths = list(decoder_widths)
        if len(decoder_widths) != len(encoder_widths) - 1:
            raise ValueError(
                f"decoder_widths needs {len(encoder_widths) - 1} entries (one per encoder level "
                f"below the bottleneck), got {len(decoder_widths)}"
            )
        self.fast = fast
        self.depth = len(encoder_widths)
        block = dict(cross_act=cross_act, act=act, norm_groups=norm_groups, heads=attn_heads)
        enc_plan, dec_plan = interaction_plan(
            self.depth, interactions, decoder_interactions, attn_pool
        )

        self.enc_blocks = nn.ModuleList()
        q_ch, s_ch = 1, 2  # query: image; support: image and label
        for width, (kind, pool) in zip(encoder_widths, enc_plan, strict=True):
            self.enc_blocks.append(make_cross_block(kind, q_ch, s_ch, width, pool=pool, **block))
            q_ch = s_ch = width
        self.dec_blocks = nn.ModuleList()
        for width, skip, (kind, pool) in zip(
            decoder_widths, encoder_widths[-2::-1], dec_plan, strict=True
        ):
            self.dec_blocks.append(
                make_cross_block(kind, q_ch + skip, s_ch + skip, width, pool=pool, **block)
            )
            q_ch = s_ch = width
        self.out_conv = ConvOp(q_ch, 1, act=None, kernel_size=1)
        self.downsample = MaxPool2x2()
        self.upsample = nn.UpsamplingBilinear2d(scale_factor=2)  # align_corners=True
        init_weights(self)

    def support_term(self, support_images: Tensor, support_labels: Tensor) -> Tensor:
        """First block's support part of the cross-conv, the one query-independent quantity.

        ``(Bs,S,1,H,W)`` x2 -> ``(Bs,S,C,H,W)``; pass it back as ``forward(..., support_term=)``
        to reuse it across queries (fast path only).
        """
        support = torch.cat([support_images, support_labels], dim=2)
        return self.enc_blocks[0].cross.support_term(support)

    def forward(
        self,
        query: Tensor,
        support_images: Tensor,
        support_labels: Tensor,
        *,
        fast: bool | None = None,
        support_term: Tensor | None = None,
    ) -> Tensor:
        """``query (B,1,H,W)``, ``support_images/labels (Bs,S,1,H,W)`` -> logits ``(B,1,H,W)``."""
        fast = self.fast if fast is None else fast
        self._check_shapes(query, support_images, support_labels)
        u = query
        v = torch.cat([support_images, support_labels], dim=2)
        skips: list[tuple[Tensor, Tensor]] = []
        for i, block in enumerate(self.enc_blocks):
            u, v = block(u, v, fast=fast, support_term=support_term if (fast and i == 0) else None)
            if i == self.depth - 1:
                break
            skips.append((u, v))
            u, v = self.downsample(u), vmap(self.downsample, v)
        for i, block in enumerate(self.dec_blocks):
            u_skip, v_skip = skips.pop()
            u = torch.cat([self.upsample(u), u_skip], dim=1)
            last = i == len(self.dec_blocks) - 1
            if fast and last and block.reads_support_mean_only:
                # Upsampling is linear: average the support first, then upsample one map
                # instead of S (the largest memory traffic of the network at S=64).
                mean = torch.cat([self.upsample(support_mean(v)), support_mean(v_skip)], dim=1)
                v = mean[:, None]
            else:
                v = torch.cat([vmap(self.upsample, v), v_skip], dim=2)
            # The last block's support output is never used: skipping it is exact.
            u, v = block(u, v, fast=fast, need_support=not (fast and last))
        return self.out_conv(u)

    def _check_shapes(self, query: Tensor, images: Tensor, labels: Tensor) -> None:
        if query.dim() != 4 or query.shape[1] != 1:
            raise ValueError(f"query must be (B,1,H,W), got {tuple(query.shape)}")
        if images.dim() != 5 or images.shape[2] != 1:
            raise ValueError(f"support_images must be (B,S,1,H,W), got {tuple(images.shape)}")
        if labels.shape != images.shape:
            raise ValueError(
                f"support_labels {tuple(labels.shape)} must match support_images "
                f"{tuple(images.shape)}"
            )
        if images.shape[0] not in (1, query.shape[0]):
            raise ValueError(
                f"support batch {images.shape[0]} must be 1 or the query batch {query.shape[0]}"
            )
        if images.shape[-2:] != query.shape[-2:]:
            raise ValueError(
                f"support size {tuple(images.shape[-2:])} differs from query size "
                f"{tuple(query.shape[-2:])}"
            )
        step = 2 ** (self.depth - 1)
        if query.shape[-2] % step or query.shape[-1] % step:
            raise ValueError(
                f"H and W must be divisible by {step} for depth {self.depth}, "
                f"got {tuple(query.shape[-2:])}"
            )


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal conv weights (leaky_relu gain), zero biases; norms keep their defaults."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="leaky_relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


@register_model
def universeg_v1(**kwargs) -> UniverSeg:
    """UniverSeg v1: 4 encoder + 3 decoder CrossBlocks of 64 features, 1,182,785 parameters."""
    return UniverSeg(**{"encoder_widths": (64, 64, 64, 64), **kwargs})


@register_model
def universeg_v1_small(**kwargs) -> UniverSeg:
    """Narrow v1 (32 features): ~4x cheaper, for CPU training and tests."""
    return UniverSeg(**{"encoder_widths": (32, 32, 32, 32), **kwargs})


@register_model
def universeg_v1_gn(**kwargs) -> UniverSeg:
    """v1 with GroupNorm(8) after every conv; the mean shortcut is then not used."""
    return UniverSeg(**{"encoder_widths": (64, 64, 64, 64), "norm_groups": 8, **kwargs})


@register_model
def universeg_attn_hybrid(**kwargs) -> UniverSeg:
    """v1 with cross-attention at the two coarsest levels (32x32, 16x16 at 128x128 input) and the
    mirrored decoder block, full-resolution keys; cross-conv at the fine levels."""
    return UniverSeg(
        **{
            "encoder_widths": (64, 64, 64, 64),
            "interactions": ("conv", "conv", "attn", "attn"),
            **kwargs,
        }
    )


@register_model
def universeg_attn_full(**kwargs) -> UniverSeg:
    """Cross-attention in every block; keys/values pooled to 1/8 of the input resolution at
    every level (``attn_pool`` 8, 4, 2, 1: 16x16 tokens per support example at 128x128), since
    full-resolution keys would cost ~2.2 T multiply-accumulates per 128x128 block at S=64."""
    return UniverSeg(
        **{
            "encoder_widths": (64, 64, 64, 64),
            "interactions": ("attn", "attn", "attn", "attn"),
            "attn_pool": (8, 4, 2, 1),
            **kwargs,
        }
    )
