"""Fingerprints of expert weights: does every slot hold the bytes of its logical expert?

A fingerprint is an int64 digest of one slot's rows in every weight tensor of a
layer: the row's bytes read as int32 words, each multiplied by a fixed odd
coefficient of its position, summed with wrapping int64 arithmetic. Wrapping
addition is associative, so the digest is the same on every device and in any
reduction order, and ranks can compare them exactly. Reordered, swapped or
foreign rows change it; it is no cryptographic hash and need not be one: it
guards against bugs (a copy that landed in the wrong slot, a replica that was
never a replica), not against an adversary.

Two modes (:data:`IntegrityMode`):

- ``"sampled"`` (the default): up to :data:`SAMPLED_WORDS` words of each row,
  evenly spread, so the cost per row is bounded whatever the expert's size. A
  row of another expert is caught with near certainty; a few flipped bytes may
  not be.
- ``"full"``: every word of every row. Reads each moved row once more.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Final, Literal

import torch
from torch import Tensor

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["INTEGRITY_MODES", "SAMPLED_WORDS", "IntegrityMode", "row_digests"]

IntegrityMode = Literal["sampled", "full", "off"]
"""How ``EplbState`` checks moved weights: see the module docstring; ``"off"`` does not."""

INTEGRITY_MODES: Final[tuple[IntegrityMode, ...]] = ("sampled", "full", "off")

SAMPLED_WORDS: Final = 4096
"""Words of each weight row a ``"sampled"`` digest reads."""

_CHUNK_ELEMENTS: Final = 1 << 22  # int64 temporaries of at most 32 MiB per step
_MIX: Final = 1_000_003  # combines the digests of a layer's several weight tensors


def _coefficients(position: Tensor) -> Tensor:
    """Odd int64 coefficients for the int64 word ``position``s."""
    return ((position * 2_654_435_761 + 97_531) % 2_147_483_647) | 1


def _words(rows: Tensor) -> Tensor:
    """``[n, m]`` int32 words of each row's bytes (zero padded to whole words).

    A view, not a copy, when the rows are contiguous and their byte length is
    a whole number of words (the common case).
    """
    flat = rows.detach()
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    flat = flat.contiguous().reshape(rows.shape[0], -1)
    data = flat.view(torch.uint8)
    pad = (-data.shape[1]) % 4
    if pad:
        data = torch.cat([data, data.new_zeros(data.shape[0], pad)], dim=1)
    return data.view(torch.int32)


@functools.lru_cache(maxsize=64)
def _plan(
    width: int, mode: IntegrityMode, device: torch.device
) -> tuple[tuple[Tensor, Tensor], ...]:
    """``(positions, coefficients)`` chunks of the words a digest of ``width`` words reads."""
    if mode == "sampled" and width > SAMPLED_WORDS:
        positions = torch.linspace(0, width - 1, SAMPLED_WORDS, device=device).long()
    else:
        positions = torch.arange(width, dtype=torch.int64, device=device)
    step = _CHUNK_ELEMENTS // 64
    return tuple(
        (where, _coefficients(where))
        for where in (positions[i : i + step] for i in range(0, positions.numel(), step))
    )


def _digest_words(words: Tensor, mode: IntegrityMode) -> Tensor:
    """``[n]`` int64 digests of the words of each row that ``mode`` reads."""
    count, width = words.shape
    digest = torch.zeros(count, dtype=torch.int64, device=words.device)
    for where, coeff in _plan(width, mode, words.device):
        if where.numel() == width:
            chunk = words.to(torch.int64)
        else:
            chunk = words.index_select(1, where).to(torch.int64)
        digest += chunk.mul_(coeff).sum(dim=1)
    return digest


def row_digests(
    weights: Sequence[Tensor], slots: Tensor | None = None, *, mode: IntegrityMode = "sampled"
) -> Tensor:
    """``[n]`` int64 CPU fingerprints of rows ``slots`` (default: all) of one layer's weights.

    ``weights`` are the layer's expert weight tensors, each ``[slots, ...]``;
    the fingerprint of a row covers that row of every tensor. Only the sampled
    words are read (no row is copied) when the weights are contiguous.
    """
    combined: Tensor | None = None
    for weight in weights:
        words = _words(weight)
        if slots is not None:
            words = words.index_select(0, slots.to(words.device)) if mode == "full" else words
        digest = _digest_words(words, mode)
        if slots is not None and mode != "full":
            digest = digest.index_select(0, slots.to(digest.device))
        digest = digest.cpu()
        combined = digest if combined is None else combined * _MIX + digest
    if combined is None:
        return torch.zeros(0 if slots is None else slots.numel(), dtype=torch.int64)
    return combined
