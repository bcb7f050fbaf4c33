"""SAM's image encoder with its attention computed in cache-sized pieces, without changing the model.

segment-anything's `Attention` forms the whole attention matrix, adds the decomposed relative-position terms to
it and applies softmax, each as a separate pass over the matrix. In the four global-attention blocks of ViT-B
that matrix has 4096 x 4096 entries for each of 12 heads (800 MB in float32), so those passes run at memory
speed: a CPU profile of the bfloat16 encoder spent about 40 % of its time in them rather than in matrix products.

`encode_image` computes the same expression, ``softmax(scale * q k^T + rel_h + rel_w) v``, for one head and a
slice of the queries at a time. Each piece of the matrix then stays in the processor's cache while the
relative-position terms are added, softmax runs and the product with the values is taken. The scores are added
and normalised in float32 even when the matrix products run in bfloat16 under autocast.

`torch.nn.functional.scaled_dot_product_attention` was slower here, in two forms timed on a 2-core AMD EPYC
virtual machine. With the relative-position terms as a full additive mask it still forms the whole matrix. With
the terms folded into the query and key as extra columns, the head size grows to 192 and the CPU flash kernel
takes its slower path.

`encode_image` reads the encoder's own weights and calls its own submodules (patch embedding, norms, linear
layers, MLPs, neck). It replaces nothing on the model, so every other user of the same model object is
unaffected. An encoder without segment-anything's `ImageEncoderViT` layout runs its own forward.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

__all__ = ["encode_image", "supports_piecewise_attention"]

logger = logging.getLogger(__name__)


def supports_piecewise_attention(encoder: torch.nn.Module) -> bool:
    """Return True when `encoder` has the layout of segment-anything's `ImageEncoderViT` that `encode_image` reads.

    Checked by class and by the attributes used, so a subclass or another encoder (for example a distilled one)
    falls back to its own forward.
    """
    try:
        from segment_anything.modeling.image_encoder import Attention, Block, ImageEncoderViT
    except ImportError:  # pragma: no cover - segment-anything is a dependency
        return False
    if type(encoder) is not ImageEncoderViT:
        return False
    for block in encoder.blocks:
        if type(block) is not Block or type(block.attn) is not Attention:
            return False
        attention = block.attn
        if not hasattr(attention, "qkv") or not hasattr(attention, "proj") or not hasattr(attention, "num_heads"):
            return False
        if attention.use_rel_pos and (getattr(attention, "rel_pos_h", None) is None
                                      or getattr(attention, "rel_pos_w", None) is None):
            return False
    return True


def _relative_table(size: int, table: torch.Tensor) -> torch.Tensor:
    """Return the ``[size, size, C]`` relative-position embeddings of query and key positions along one axis.

    Same as segment-anything's `get_rel_pos` for equal query and key sizes: the learnt table is resized linearly
    when its length is not ``2 * size - 1``.
    """
    length = 2 * size - 1
    if table.shape[0] != length:
        table = F.interpolate(table.reshape(1, table.shape[0], -1).permute(0, 2, 1), size=length, mode="linear")
        table = table.reshape(-1, length).permute(1, 0)
    coordinates = torch.arange(size, device=table.device)
    relative = coordinates[:, None] - coordinates[None, :] + (size - 1)
    return table[relative.long()]


ATTENTION_PIECE_ELEMENTS = 1 << 22
"""Attention scores computed at once (4 Mi float32 values, 16 MB): one head and 1024 queries of a 64 x 64 grid.

NOTE: picked by timing 2**20 to 2**23 on one 2-core AMD EPYC virtual machine, where 2**21 and 2**22 were fastest
and 2**23 was 50 % slower. Processors with other cache sizes may prefer another value."""


def _attention(attention: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """segment-anything's ``Attention.forward`` on ``x`` of shape ``[B, H, W, C]``, computed piece by piece."""
    batch, height, width, _ = x.shape
    heads = attention.num_heads
    tokens = height * width
    qkv = attention.qkv(x).reshape(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)
    # q, k, v: [B * heads, tokens, head_dim], in the compute type (bfloat16 under autocast).
    query, key, value = qkv.reshape(3, batch * heads, tokens, -1).unbind(0)
    head_dim = query.shape[-1]

    rel_h = rel_w = None
    if attention.use_rel_pos:
        table_h = _relative_table(height, attention.rel_pos_h).to(query.dtype)
        table_w = _relative_table(width, attention.rel_pos_w).to(query.dtype)
        grid_query = query.reshape(batch * heads, height, width, head_dim)
        # rel_h[n, i, j, m] = q[n, i, j] . table_h[i, m] with the unscaled query, as in segment-anything. rel_w
        # is the same along the columns.
        rel_h = torch.einsum("nijc,imc->nijm", grid_query, table_h).float().reshape(batch * heads, tokens, height, 1)
        rel_w = torch.einsum("nijc,jmc->nijm", grid_query, table_w).float().reshape(batch * heads, tokens, 1, width)
    scaled_query = query * attention.scale
    keys_t = key.transpose(1, 2)

    # Pieces: several whole heads when a head's matrix is small (windowed blocks), else slices of one head.
    per_head = tokens * tokens
    group = max(1, ATTENTION_PIECE_ELEMENTS // per_head)
    rows = tokens if group > 1 else max(1, ATTENTION_PIECE_ELEMENTS // tokens)
    output = torch.empty_like(value)
    # The operands already have the compute type, so autocast would only add casts, and it rejects out=.
    with torch.autocast(device_type=x.device.type, enabled=False):
        for first in range(0, batch * heads, group):
            last = min(first + group, batch * heads)
            for start in range(0, tokens, rows):
                stop = min(start + rows, tokens)
                scores = torch.matmul(scaled_query[first:last, start:stop], keys_t[first:last])
                scores = scores.float()
                if rel_h is not None:
                    scores = scores.view(last - first, stop - start, height, width)
                    scores += rel_h[first:last, start:stop]
                    scores += rel_w[first:last, start:stop]
                    scores = scores.view(last - first, stop - start, tokens)
                probabilities = torch.softmax(scores, dim=-1).to(value.dtype)
                torch.matmul(probabilities, value[first:last], out=output[first:last, start:stop])
    output = output.view(batch, heads, height, width, head_dim).permute(0, 2, 3, 1, 4)
    return attention.proj(output.reshape(batch, height, width, heads * head_dim))


def _block(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """segment-anything's ``Block.forward`` with the piecewise attention."""
    from segment_anything.modeling.image_encoder import window_partition, window_unpartition

    shortcut = x
    x = block.norm1(x)
    if block.window_size > 0:
        height, width = x.shape[1], x.shape[2]
        x, padded = window_partition(x, block.window_size)
        x = _attention(block.attn, x)
        x = window_unpartition(x, block.window_size, padded, (height, width))
    else:
        x = _attention(block.attn, x)
    x = shortcut + x
    return x + block.mlp(block.norm2(x))


def encode_image(encoder: torch.nn.Module, images: torch.Tensor, *, piecewise: bool = True) -> torch.Tensor:
    """Return SAM's image embedding of preprocessed ``[B, 3, S, S]`` images.

    Args:
        encoder: ``sam.image_encoder``.
        images: Input after ``sam.preprocess`` (normalised and padded to the encoder's side).
        piecewise: False runs the encoder's own forward (the reference). True uses the piecewise attention for
            images on the CPU when the encoder's layout is supported (`supports_piecewise_attention`), and the
            encoder's own forward otherwise.

    Returns:
        ``[B, 256, S / 16, S / 16]`` embedding, the same values as ``encoder(images)`` up to rounding.
    """
    # NOTE: GPUs run the encoder's own forward, because the piecewise loop was timed only on CPUs.
    if not piecewise or images.device.type != "cpu":
        return encoder(images)
    if not supports_piecewise_attention(encoder):
        logger.debug("SAM image encoder %s has an unknown layout; using its own forward.", type(encoder).__name__)
        return encoder(images)
    x = encoder.patch_embed(images)
    if encoder.pos_embed is not None:
        x = x + encoder.pos_embed
    for block in encoder.blocks:
        x = _block(block, x)
    return encoder.neck(x.permute(0, 3, 1, 2))
