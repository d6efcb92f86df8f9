"""The open swap search: each rank over its limit trades with the best partner in its row."""

from __future__ import annotations

import functools
import math
from typing import Final, NamedTuple

import torch

from moe_protocols.eplb.policies.migration._rows import EPS

__all__ = ["search_and_read"]

# Candidate partners examined for a best fit, below the largest that could do.

# Candidate partners examined for a best fit, below the largest that could do.
_FIT_WINDOW: Final = 4


# Open-search trades are scored by fit (full fixes between 1 and 2, partial
# ones below 1) minus this much per slot a trade refetches beyond those it
# returns to an old holder: of two equally good fixes, the one that refetches
# no new slot wins by 0.5 over one that refetches two.
_OPEN_COST_WEIGHT: Final = 0.25


def search_and_read(
    placed_slots: torch.Tensor,
    slot_load: torch.Tensor,
    num_experts: int,
    target: torch.Tensor,
    max_rounds: int,
    held: torch.Tensor | None = None,
) -> torch.Tensor:
    """Slack-search a ``[X, K, S]`` placement of expert ids; returns the improved one.

    ``held`` (``[X, K * n]``, see :func:`holding`): the placement before the
    repair, so trades that refetch fewer slots are preferred; ``None`` for
    fresh plans.
    """
    num_rows = placed_slots.shape[0]
    flat = placed_slots.view(num_rows, -1)
    order = torch.sort(slot_load, dim=1, stable=True).indices
    weight = slot_load.gather(1, order)
    expert = flat.gather(1, order)
    item_of_slot = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1]).expand(num_rows, -1)
    )
    placed = item_of_slot.view(placed_slots.shape).contiguous()
    _slack_search(placed, weight, expert, num_experts, target, max_rounds, held)
    return expert.gather(1, placed.view(num_rows, -1)).view(placed_slots.shape)


def _slack_search(
    placed: torch.Tensor,
    weight: torch.Tensor,
    expert: torch.Tensor,
    num_experts: int,
    target: torch.Tensor,
    max_rounds: int,
    held: torch.Tensor | None = None,
) -> None:
    """Lower every rank above ``target`` by swaps with ranks that have room, in place.

    Open rounds: every rank over the limit looks for its best partner replica
    anywhere in the row, and the claimants of one rank share its room,
    hottest first. A trade keeps the partner within the limit and never puts
    an expert on a rank that holds it. Every trade costs two slots, so none
    is made on a rank that stays below the hottest rank's level anyway.

    Args:
        placed: ``[X, K, S]`` replica (index into ``weight``) in each slot.
        weight: ``[X, Q]`` replica loads, non-decreasing along each row.
        expert: ``[X, Q]`` expert of each replica, ids in ``[0, num_experts)``.
        num_experts: ``n``.
        target: ``[X]`` load a rank may have; a row whose hottest rank finds
            no trade at all relaxes it halfway to that rank's load.
        max_rounds: bound on rounds.
    """
    num_rows, num_ranks, slots = placed.shape
    if num_ranks < 2 or slots < 1 or max_rounds == 0:
        return
    search = _Search(
        placed.view(num_rows, -1), num_ranks, weight, expert, num_experts, target, held
    )
    for _ in range(max_rounds):
        if not search.narrow():
            break
        search.open_round()
    search.write_back()


@functools.lru_cache(maxsize=8)
def _fit_codes(width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tables for ``width``-bit codes (shared, read only).

    Returns ``([W] bit values, [2**W] bits set, [2**W * W] position of the
    (t + 1)-th set bit at ``code * W + t``, 0 past the last)``.
    """
    codes = torch.arange(2**width)
    bits = 2 ** torch.arange(width)
    is_set = (codes.unsqueeze(1) & bits) > 0
    # The j-th bit, if set, is the (seen[j] + 1)-th; unset bits write 0 to the
    # last column, which a set bit reaches only when all are set.
    seen = is_set.cumsum(dim=1) - 1
    position = torch.arange(width).expand_as(seen)
    nth = torch.zeros(2**width, width, dtype=torch.int64)
    nth.scatter_(1, torch.where(is_set, seen, width - 1), torch.where(is_set, position, 0))
    return bits, is_set.sum(dim=1), nth.flatten()


@functools.lru_cache(maxsize=64)
def _hot_order(num_hot: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``([H] 0..H-1, [H, H] i after j, [H, H] i after or at j)`` for ``H`` hot ranks (shared)."""
    order = torch.arange(num_hot)
    before = torch.ones(num_hot, num_hot, dtype=torch.bool).tril(diagonal=-1)
    return order, before, before | torch.eye(num_hot, dtype=torch.bool)


class _Hot(NamedTuple):
    """The hot ranks of an open round and the replicas on them (``H`` ranks, ``S`` slots)."""

    hot_load: torch.Tensor  # [A, H]
    hot: torch.Tensor  # [A, H] rank ids, hottest first
    own: torch.Tensor  # [A, H * S] replicas on them
    a: torch.Tensor  # [A, H * S] their loads
    need: torch.Tensor  # [A, H] load above the limit
    over: torch.Tensor  # [A, H, 1] above the limit (else padding)
    room_of_rank: torch.Tensor  # [A, K] limit minus load


class _Partners(NamedTuple):
    """The partner replica of every replica on a hot rank."""

    partner: torch.Tensor  # [A, H * S]
    has_room: torch.Tensor  # [A, H * S] its rank stays within the limit
    has_partner: torch.Tensor  # [A, H * S]


class _Trades(NamedTuple):
    """Every candidate trade of an open round."""

    ok: torch.Tensor  # [A, H, S] allowed
    gain: torch.Tensor  # [A, H * S] load the hot rank sheds
    score: torch.Tensor  # [A, H * S]
    partner_rank: torch.Tensor  # [A, H * S]
    own_expert: torch.Tensor  # [A, H * S]


def _refetch_cost(
    held: torch.Tensor,
    hot: torch.Tensor,
    n: int,
    by_rank: tuple[int, int, int],
    partner_rank: torch.Tensor,
    own_expert: torch.Tensor,
    partner_expert: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Slots a trade refetches beyond those it hands back to a rank that held them before."""
    num_rows = hot.shape[0]
    hot_slot = (hot * n).unsqueeze(2).expand(by_rank).reshape(num_rows, -1)
    fresh = [
        ~held.gather(1, index)
        for index in (
            hot_slot + partner_expert,
            partner_rank * n + own_expert,
            hot_slot + own_expert,
            partner_rank * n + partner_expert,
        )
    ]
    return (fresh[0].to(dtype) + fresh[1]) - (fresh[2].to(dtype) + fresh[3])


def _one_claim_at_a_time(
    h: _Hot,
    t: _Trades,
    accept: torch.Tensor,
    pick: torch.Tensor,
    chosen: torch.Tensor,
    chosen_partner: torch.Tensor,
    before: torch.Tensor,
    upto: torch.Tensor,
) -> torch.Tensor:
    """Claimants of one partner rank trade, hottest first, while what they bring fits its
    room, they take different replicas and bring different experts; the rest wait for the
    next round. Returns the accepted trades."""
    delta = t.gain.gather(1, pick)
    shared = (chosen.unsqueeze(2) == chosen.unsqueeze(1)) & accept.unsqueeze(1)
    claimed = ((shared & upto) * delta.unsqueeze(1)).sum(dim=2)
    accept = accept & (claimed <= h.room_of_rank.gather(1, chosen))
    bringing = t.own_expert.gather(1, pick)
    clash = (chosen_partner.unsqueeze(2) == chosen_partner.unsqueeze(1)) | (
        bringing.unsqueeze(2) == bringing.unsqueeze(1)
    )
    accept &= ~(shared & before & clash).any(dim=2)
    # The row's peak stays at least the hottest rank's load after its
    # best trade: trading on ranks already below that buys nothing.
    floor = h.hot_load[:, :1] - torch.where(accept[:, :1], delta[:, :1], 0.0)
    accept[:, 1:] &= h.hot_load[:, 1:] > floor
    return accept


class _Search:
    """Working tensors of one slack search, narrowed to rows with a rank over their limit.

    An open round is about a hundred small tensor operations of a few
    microseconds each; the two binary searches and the running maximum over
    ``[A, Q]`` cost the most. So a round costs nearly as much for a few rows
    as for many, and each operation saved counts in every round.
    """

    def __init__(
        self,
        out: torch.Tensor,
        num_ranks: int,
        weight: torch.Tensor,
        expert: torch.Tensor,
        num_experts: int,
        target: torch.Tensor,
        held: torch.Tensor | None = None,
    ) -> None:
        num_rows, num_slots = out.shape
        self.held = held  # [A, K * n] old placement, or None (no migration cost)
        self.out = out  # [X, Q] the caller's placement, written back on narrowing
        self.num_ranks = num_ranks
        self.slots = num_slots // num_ranks
        self.num_slots = num_slots
        self.num_experts = num_experts
        self.active = torch.arange(num_rows)  # [A] caller's row of each working row
        self.flat = out.clone()  # [A, Q] replica in each slot
        self.weight = weight  # [A, Q] ascending
        self.expert = expert  # [A, Q]
        # position[x, r]: slot of replica r (the inverse of flat).
        slot = torch.arange(num_slots).expand(num_rows, -1)
        self.position = torch.empty_like(out).scatter_(1, out, slot)  # [A, Q]
        self.rank_of = self.position // self.slots  # [A, Q]
        self.rank_load = weight.gather(1, out).view(num_rows, num_ranks, -1).sum(dim=2)  # [A, K]
        # present[x, k * n + e]: rank k of row x holds a replica of expert e.
        self.present = torch.zeros(num_rows, num_ranks * num_experts, dtype=torch.bool)
        self.present.scatter_(1, self.rank_of * num_experts + expert, True)
        self.limit = target.unsqueeze(1).clone()  # [A, 1]
        self.over = self.rank_load > self.limit * (1 + EPS)  # [A, K], kept by narrow()
        self.in_rank = torch.arange(self.slots)
        self.window = torch.arange(min(_FIT_WINDOW, num_slots))
        self.bits, self.fit_count, self.nth_fit = _fit_codes(self.window.numel())

    def write_back(self) -> None:
        self.out[self.active] = self.flat

    def narrow(self) -> bool:
        """Drop rows with nothing over the limit; False when none is left."""
        self.over = self.rank_load > self.limit * (1 + EPS)
        busy = self.over.any(dim=1)
        if bool(busy.all()):
            return True
        self.write_back()
        keep = busy.nonzero().squeeze(1)
        for name in (
            "active",
            "flat",
            "weight",
            "expert",
            "position",
            "rank_of",
            "rank_load",
            "present",
            "limit",
            "over",
        ):
            setattr(self, name, getattr(self, name)[keep])
        if self.held is not None:
            self.held = self.held[keep]
        return keep.numel() > 0

    def open_round(self) -> None:
        """One round: every hot rank trades its best-scoring replica, where claims allow."""
        hot = self._hot_ranks()
        partners = self._partners(hot)
        trades = self._trades(hot, partners)
        num_rows, num_hot = hot.hot.shape
        order, before, upto = _hot_order(num_hot)
        by_rank = (num_rows, num_hot, self.slots)
        best, which = torch.where(trades.ok, trades.score.view(by_rank), -math.inf).max(dim=2)
        accept = best > -math.inf
        pick = which + order * self.slots  # [A, H] index into [A, H * S]
        chosen_partner = partners.partner.gather(1, pick)
        chosen = trades.partner_rank.gather(1, pick)
        if num_hot > 1:
            accept = _one_claim_at_a_time(
                hot, trades, accept, pick, chosen, chosen_partner, before, upto
            )
        # A row whose hottest rank found no trade at all relaxes its limit halfway to that rank.
        stuck = hot.over[:, :1, 0] & ~accept[:, :1]
        self.limit = torch.where(
            stuck, self.limit + (hot.hot_load[:, :1] - self.limit) / 2, self.limit
        )
        if bool(accept.any()):
            self.swap(accept, hot.hot, hot.own.gather(1, pick), chosen, chosen_partner)

    def _hot_ranks(self) -> _Hot:
        """The hot ranks, hottest first; at most half the ranks (the rest are partners)."""
        num_hot = min(int(self.over.sum(dim=1).max()), self.num_ranks // 2)
        hot_load, hot = torch.topk(self.rank_load, num_hot, dim=1)
        own = self.flat.gather(1, (hot.unsqueeze(2) * self.slots + self.in_rank).flatten(1))
        return _Hot(
            hot_load=hot_load,
            hot=hot,
            own=own,
            a=self.weight.gather(1, own),
            need=hot_load - self.limit,
            over=self.over.gather(1, hot).unsqueeze(2),
            room_of_rank=self.limit - self.rank_load,
        )

    def _partners(self, h: _Hot) -> _Partners:
        """The partner replica ``b`` of every replica ``a`` on a hot rank."""
        num_rows, num_hot = h.hot.shape
        by_rank = (num_rows, num_hot, self.slots)
        # key[b] >= a  <=>  b's rank stays within the limit after trading b for a.
        # Stored after W entries of -inf: the window below the first replica reads them.
        width = self.window.numel()
        padded = self.weight.new_full((num_rows, width + self.num_slots), -math.inf)
        key = padded[:, width:]
        torch.add(self.weight, h.room_of_rank.gather(1, self.rank_of), out=key)
        order = _hot_order(num_hot)[0]
        # Full fix, best fit: the largest b <= a - need (the hot rank reaches the
        # limit) whose rank has room for a - b, among the few largest such b;
        # failing that, the b whose rank keeps the most room. The binary
        # searches cost mostly mispredicted branches: padding entries (ranks
        # not over the limit) search a constant instead, which costs next to nothing.
        wanted = torch.where(h.over, h.a.view(by_rank) - h.need.unsqueeze(2), -math.inf)
        end = torch.searchsorted(self.weight, wanted.view(num_rows, -1), right=True).sub_(1)
        # Candidates end, end - 1, ..., end - W + 1 (as indices into padded).
        near = (end + width).unsqueeze(2) - self.window
        fits = padded.gather(1, near.flatten(1)).view(near.shape) >= h.a.unsqueeze(2)
        # Which of the W candidates fit, as a W-bit code (bit j: candidate end - j).
        code = (fits * self.bits).sum(dim=2)
        fitting = code > 0
        # Hot ranks with similar needs would all pick the same best fit; the
        # i-th hottest takes the (i mod f)-th of its f fits, so they spread.
        total = self.fit_count.take(code)
        turn = (order.view(1, -1, 1) % total.view(by_rank).clamp(min=1)).view(num_rows, -1)
        nearest = end - self.nth_fit.take(code * width + turn)
        running_max, running_at = torch.cummax(key, dim=1)
        last = end.clamp(min=0)
        anywhere = (end >= 0) & (running_max.gather(1, last) >= h.a)
        # Partial fix: the smallest b that fits (the largest drop of the hot rank).
        # Every partner picked below has key >= a (a fitting b, or where the
        # running maximum of key reaches a), except where no b fits at all.
        has_room = fitting | anywhere
        searched = torch.where(h.over & ~has_room.view(by_rank), h.a.view(by_rank), math.inf)
        first = torch.searchsorted(running_max, searched.view(num_rows, -1))
        partner = torch.where(
            fitting,
            nearest,
            torch.where(anywhere, running_at.gather(1, last), first.clamp_(max=self.num_slots - 1)),
        )
        return _Partners(partner, has_room, has_room | (first < self.num_slots))

    def _trades(self, h: _Hot, p: _Partners) -> _Trades:
        """Which trades are allowed, what each gains, and how each scores."""
        num_rows, num_hot = h.hot.shape
        by_rank = (num_rows, num_hot, self.slots)
        b = self.weight.gather(1, p.partner)
        partner_rank = self.rank_of.gather(1, p.partner)
        n = self.num_experts
        own_expert = self.expert.gather(1, h.own)
        partner_expert = self.expert.gather(1, p.partner)
        # The partner rank holds the expert brought, or the hot rank the one taken.
        clash = self.present.gather(1, partner_rank * n + own_expert)
        clash |= self.present.gather(
            1, ((h.hot * n).unsqueeze(2) + partner_expert.view(by_rank)).view(num_rows, -1)
        )
        ok = (p.has_partner & (b < h.a) & ~clash).view(by_rank).logical_and_(h.over)
        gain = h.a - b
        need = h.need.unsqueeze(2)
        score = torch.where(
            p.has_room,
            2 - (gain.view(by_rank) - need).view(num_rows, -1) / self.limit,
            (gain.view(by_rank) / need).view(num_rows, -1),
        )
        if self.held is not None:
            cost = _refetch_cost(
                self.held, h.hot, n, by_rank, partner_rank, own_expert, partner_expert, score.dtype
            )
            score = score - cost * _OPEN_COST_WEIGHT
        return _Trades(ok, gain, score, partner_rank, own_expert)

    def swap(
        self,
        accept: torch.Tensor,
        giver: torch.Tensor,
        item_a: torch.Tensor,
        taker: torch.Tensor,
        item_b: torch.Tensor,
    ) -> None:
        """Trade replica ``item_a`` of rank ``giver`` for ``item_b`` of ``taker`` where accepted."""
        row, pair = accept.nonzero(as_tuple=True)
        item_a, item_b = item_a[row, pair], item_b[row, pair]
        rank_a, rank_b = giver[row, pair], taker[row, pair]
        slot_a, slot_b = self.position[row, item_a], self.position[row, item_b]
        self.flat[row, slot_a] = item_b
        self.flat[row, slot_b] = item_a
        self.position[row, item_a] = slot_b
        self.position[row, item_b] = slot_a
        self.rank_of[row, item_a] = rank_b
        self.rank_of[row, item_b] = rank_a
        moved = self.weight[row, item_a] - self.weight[row, item_b]
        # Several givers may trade with one taker: accumulate.
        self.rank_load.index_put_((row, rank_a), -moved, accumulate=True)
        self.rank_load.index_put_((row, rank_b), moved, accumulate=True)
        expert_a, expert_b = self.expert[row, item_a], self.expert[row, item_b]
        n = self.num_experts
        self.present[row, rank_a * n + expert_a] = False
        self.present[row, rank_b * n + expert_b] = False
        self.present[row, rank_a * n + expert_b] = True
        self.present[row, rank_b * n + expert_a] = True
