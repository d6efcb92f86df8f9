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

- ``"sampled"`` (the default): rows of up to 16 KiB words are read whole;
  of a longer row, :data:`SAMPLED_WORDS` words in :data:`SAMPLED_BLOCKS`
  contiguous blocks spread evenly over it, so the cost per row is bounded
  whatever the expert's size. A row of another expert is caught with near
  certainty; a few flipped bytes may not be.
- ``"full"``: every word of every row. Reads each moved row once more.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Final, Literal

import attrs
import torch
from torch import Tensor

from moe_protocols._torch_typed import int_list

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["INTEGRITY_MODES", "SAMPLED_WORDS", "IntegrityMode", "row_digests"]

IntegrityMode = Literal["sampled", "full", "off"]
"""How ``EplbState`` checks moved weights: see the module docstring; ``"off"`` does not."""

INTEGRITY_MODES: Final[tuple[IntegrityMode, ...]] = ("sampled", "full", "off")

SAMPLED_WORDS: Final = 4096
"""Words of each weight row a ``"sampled"`` digest reads."""

SAMPLED_BLOCKS: Final = 16
"""Contiguous blocks those words are read in."""

_WHOLE_ROW_WORDS: Final = 4 * SAMPLED_WORDS  # shorter rows are read whole: fewer, larger ops
_CHUNK_ELEMENTS: Final = 1 << 22  # int64 temporaries of at most 32 MiB per step
_MIX: Final = 1_000_003  # combines the digests of a layer's several weight tensors


@attrs.frozen(eq=False)
class _Span:
    """Columns ``[start, stop)`` of a row's words and their coefficients."""

    start: int
    stop: int
    coefficients: Tensor


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
def _plan(width: int, mode: IntegrityMode, device: torch.device) -> tuple[_Span, ...]:
    """The column spans of a ``width``-word row that a digest reads, with their coefficients.

    ``"sampled"`` reads :data:`SAMPLED_BLOCKS` blocks of contiguous words
    spread evenly over the row: contiguous reads cost a few cache lines per
    block, where scattered single words would cost a cache miss each.
    """
    if mode == "sampled" and width > _WHOLE_ROW_WORDS:
        block = SAMPLED_WORDS // SAMPLED_BLOCKS
        starts = int_list(torch.linspace(0, width - block, SAMPLED_BLOCKS).long())
        spans = [(start, start + block) for start in starts]
    else:
        step = _CHUNK_ELEMENTS // 64
        spans = [(start, min(width, start + step)) for start in range(0, width, step)]
    return tuple(
        _Span(
            start,
            stop,
            _coefficients(torch.arange(start, stop, dtype=torch.int64, device=device)),
        )
        for start, stop in spans
    )


def _digest_words(words: Tensor, mode: IntegrityMode) -> Tensor:
    """``[n]`` int64 digests of the words of each row that ``mode`` reads."""
    digest = torch.zeros(words.shape[0], dtype=torch.int64, device=words.device)
    for span in _plan(words.shape[1], mode, words.device):
        digest += words[:, span.start : span.stop].to(torch.int64).mul_(span.coefficients).sum(1)
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
