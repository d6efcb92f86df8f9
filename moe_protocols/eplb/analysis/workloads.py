"""Seeded generators of per-layer expert loads on realistic MoE shapes, for benchmarks and tests.

Everything here is synthetic but calibrated on published figures (see
``shared/research/eplb.md`` section 5); nothing is read from disk or the network.

Shapes (:class:`MoEShape`):

* ``DEEPSEEK_V3_288`` - DeepSeek-V3/R1 prefill deployment: 58 MoE layers,
  256 routed experts in 8 groups, 288 physical slots (32 redundant) over 32
  EP ranks on 4 nodes (9 slots per rank).
* ``DEEPSEEK_V3_320`` - DeepSeek-V3 with 64 redundant slots: 320 slots over
  64 ranks on 8 nodes (5 slots per rank).
* ``QWEN3_235B`` - Qwen3-MoE-235B-like: 94 MoE layers, 128 experts, no
  groups, 160 slots over 32 ranks on 4 nodes (5 slots per rank).

A shape with ``num_groups % num_nodes == 0`` is served hierarchically by the
DeepSeek algorithm (whole groups stay inside a node); :meth:`MoEShape.as_global`
returns the same deployment with one group, which selects the global variant.

Load distributions (:class:`LoadDistribution`), each a per-layer vector of
token counts summing to ``tokens_per_layer``:

* ``lognormal`` - every expert's popularity is ``exp(N(0, spread^2))``;
  ``spread`` 0.5 / 1.0 / 1.5 gives a hottest expert ~3.5 / 10 / 22 x the mean
  over 256 experts. Realistic DeepSeek-V3 loads sit around 0.8-1.2.
* ``zipf`` - expert ``i`` of a per-layer random permutation gets
  ``1 / (i + 1)^spread``; exponents 0.6 / 0.8 / 1.1 give ~12 / 24 / 53 x.
  1.1 is beyond anything reported for DeepSeek-V3 and serves as a stress case.
* ``hotspot`` - lognormal(0.8) everywhere, plus a quarter of the layers in
  which one expert carries ``spread`` x the mean expert load (TensorRT-LLM and
  CRAFT report 10-20 x on a few layers).

Drift between load windows (:class:`Drift`), applied to a window's loads to
get the next window's (per-layer totals are kept):

* ``lognormal`` - every expert's load is multiplied by ``exp(N(0, spread^2))``.
* ``heating`` - ``num_hot`` experts per layer (fixed for the whole sequence)
  are multiplied by ``spread`` each window, all others unchanged.

Per-step sampling noise: :func:`sample_step_loads` draws the token counts of
single forward steps around a window's mean.

All generators take a ``seed`` and use their own ``torch.Generator``: the same
arguments give the same tensor, whatever else runs in the process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, Literal, TypeVar

import attrs
import torch

from moe_protocols.eplb import _limits
from moe_protocols.errors import WorkloadError

__all__ = [
    "DEEPSEEK_V3_288",
    "DEEPSEEK_V3_320",
    "QWEN3_235B",
    "STANDARD_DISTRIBUTIONS",
    "STANDARD_SHAPES",
    "Drift",
    "LoadDistribution",
    "MoEShape",
    "WorkloadError",
    "drift_sequence",
    "sample_step_loads",
]

_Kind = TypeVar("_Kind", bound=str)

DEFAULT_TOKENS_PER_LAYER: Final = 200_000 * 8
"""Token-expert assignments per layer in one load window (200k tokens, top-8)."""


def _positive_int(instance: object, attribute: attrs.Attribute[int], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise WorkloadError(
            f"{type(instance).__name__}.{attribute.name} must be an int >= 1, got {value!r}"
        )


def _non_negative_float(instance: object, attribute: attrs.Attribute[float], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise WorkloadError(
            f"{type(instance).__name__}.{attribute.name} must be a number >= 0, got {value!r}"
        )


def _one_of(*options: _Kind) -> Callable[[object, attrs.Attribute[_Kind], object], None]:
    def check(instance: object, attribute: attrs.Attribute[_Kind], value: object) -> None:
        if value not in options:
            raise WorkloadError(
                f"{type(instance).__name__}.{attribute.name} must be one of {options}, "
                f"got {value!r}"
            )

    return check


def _generator(seed: int) -> torch.Generator:
    if isinstance(seed, bool) or not isinstance(seed, int):  # pyright: ignore[reportUnnecessaryIsInstance]  # callers without a checker
        raise WorkloadError(f"seed must be an int, got {seed!r}")
    return torch.Generator().manual_seed(seed)


def _check_load(load: torch.Tensor, what: str) -> None:
    if load.dim() != 2 or load.shape[0] < 1 or load.shape[1] < 1:
        raise WorkloadError(
            f"{what} must be a non-empty [layers, logical] tensor, got {tuple(load.shape)}"
        )


@attrs.frozen
class MoEShape:
    """One MoE deployment: model sizes and how its expert slots are spread over ranks and nodes."""

    name: str
    num_layers: int = attrs.field(validator=_positive_int)
    num_logical: int = attrs.field(validator=_positive_int)
    num_groups: int = attrs.field(validator=_positive_int)
    num_physical: int = attrs.field(validator=_positive_int)
    num_ranks: int = attrs.field(validator=_positive_int)
    num_nodes: int = attrs.field(validator=_positive_int)
    expert_bytes: int = attrs.field(validator=_positive_int)
    """Bytes of one expert's weights (what one moved slot costs on the wire)."""

    def __attrs_post_init__(self) -> None:
        if self.num_physical < self.num_logical or self.num_physical % self.num_ranks != 0:
            raise WorkloadError(
                f"MoEShape {self.name!r}: num_physical={self.num_physical} must be >= "
                f"num_logical={self.num_logical} and a multiple of num_ranks={self.num_ranks}"
            )
        if self.num_ranks % self.num_nodes != 0:
            raise WorkloadError(
                f"MoEShape {self.name!r}: num_ranks={self.num_ranks} must be a multiple of "
                f"num_nodes={self.num_nodes}"
            )

    @property
    def hierarchical(self) -> bool:
        """Whether the DeepSeek algorithm keeps whole groups on a node for this shape."""
        return self.num_groups % self.num_nodes == 0 and self.num_logical % self.num_groups == 0

    @property
    def slots_per_rank(self) -> int:
        """Physical slots on one EP rank."""
        return self.num_physical // self.num_ranks

    def as_global(self) -> MoEShape:
        """The same deployment with one expert group, which selects the global policy variant."""
        return attrs.evolve(self, name=f"{self.name}/global", num_groups=1)


# DeepSeek-V3 expert: gate, up and down projections of 7168 x 2048, FP8.
_DEEPSEEK_V3_EXPERT_BYTES: Final = 3 * 7168 * 2048
# Qwen3-235B expert: 3 x 4096 x 1536, BF16.
_QWEN3_235B_EXPERT_BYTES: Final = 3 * 4096 * 1536 * 2

DEEPSEEK_V3_288: Final = MoEShape(
    name="deepseek-v3/288x32",
    num_layers=58,
    num_logical=256,
    num_groups=8,
    num_physical=288,
    num_ranks=32,
    num_nodes=4,
    expert_bytes=_DEEPSEEK_V3_EXPERT_BYTES,
)
DEEPSEEK_V3_320: Final = MoEShape(
    name="deepseek-v3/320x64",
    num_layers=58,
    num_logical=256,
    num_groups=8,
    num_physical=320,
    num_ranks=64,
    num_nodes=8,
    expert_bytes=_DEEPSEEK_V3_EXPERT_BYTES,
)
QWEN3_235B: Final = MoEShape(
    name="qwen3-235b/160x32",
    num_layers=94,
    num_logical=128,
    num_groups=1,
    num_physical=160,
    num_ranks=32,
    num_nodes=4,
    expert_bytes=_QWEN3_235B_EXPERT_BYTES,
)

STANDARD_SHAPES: Final[tuple[MoEShape, ...]] = (
    DEEPSEEK_V3_288,
    DEEPSEEK_V3_288.as_global(),
    DEEPSEEK_V3_320,
    DEEPSEEK_V3_320.as_global(),
    QWEN3_235B,
)
"""The shapes the policy benchmark covers (hierarchical and global DeepSeek-V3, Qwen3)."""


DistributionKind = Literal["lognormal", "zipf", "hotspot"]


@attrs.frozen
class LoadDistribution:
    """A family of per-layer expert popularity vectors; see the module docstring for each kind."""

    kind: DistributionKind = attrs.field(validator=_one_of("lognormal", "zipf", "hotspot"))
    spread: float = attrs.field(validator=_non_negative_float)
    """lognormal: sigma; zipf: exponent; hotspot: hot expert's load over the mean expert's."""

    @property
    def name(self) -> str:
        """Short label, e.g. ``lognormal-1.0``."""
        return f"{self.kind}-{self.spread:g}"

    def sample(
        self,
        num_layers: int,
        num_logical: int,
        *,
        seed: int,
        tokens_per_layer: float = DEFAULT_TOKENS_PER_LAYER,
    ) -> torch.Tensor:
        """Draw ``[num_layers, num_logical]`` float64 loads; every layer sums to the token count."""
        if num_layers < 1 or num_logical < 1:
            raise WorkloadError(
                f"{self.name}: need at least one layer and one expert, "
                f"got {num_layers}x{num_logical}"
            )
        if not tokens_per_layer > 0:
            raise WorkloadError(
                f"{self.name}: tokens_per_layer must be > 0, got {tokens_per_layer}"
            )
        gen = _generator(seed)
        shape = (num_layers, num_logical)
        if self.kind == "lognormal":
            popularity = torch.exp(
                self.spread * torch.randn(shape, generator=gen, dtype=torch.float64)
            )
        elif self.kind == "zipf":
            ranks = torch.argsort(torch.rand(shape, generator=gen, dtype=torch.float64), dim=1)
            popularity = (ranks + 1).to(torch.float64).pow(-self.spread)
        else:
            popularity = torch.exp(0.8 * torch.randn(shape, generator=gen, dtype=torch.float64))
            popularity /= popularity.mean(dim=1, keepdim=True)
            hot_layers = torch.rand(num_layers, generator=gen) < 0.25
            hot_expert = torch.randint(num_logical, (num_layers,), generator=gen)
            layer_ids = torch.arange(num_layers)[hot_layers]
            popularity[layer_ids, hot_expert[hot_layers]] = self.spread
        return popularity * (tokens_per_layer / popularity.sum(dim=1, keepdim=True))


STANDARD_DISTRIBUTIONS: Final[tuple[LoadDistribution, ...]] = (
    LoadDistribution("lognormal", 0.5),
    LoadDistribution("lognormal", 1.0),
    LoadDistribution("lognormal", 1.5),
    LoadDistribution("zipf", 0.6),
    LoadDistribution("zipf", 0.8),
    LoadDistribution("zipf", 1.1),
    LoadDistribution("hotspot", 15.0),
)
"""The distributions the policy benchmark covers."""


DriftKind = Literal["lognormal", "heating"]


@attrs.frozen
class Drift:
    """How one load window turns into the next; see the module docstring for each kind."""

    kind: DriftKind = attrs.field(validator=_one_of("lognormal", "heating"))
    spread: float = attrs.field(validator=_non_negative_float)
    """lognormal: sigma of the multiplicative noise; heating: factor per window."""
    num_hot: int = attrs.field(default=4, validator=_positive_int)
    """heating: experts per layer that heat up."""

    @property
    def name(self) -> str:
        """Short label, e.g. ``drift-lognormal-0.2``."""
        if self.kind == "heating":
            return f"heating-{self.num_hot}x{self.spread:g}"
        return f"drift-{self.kind}-{self.spread:g}"


def drift_sequence(
    initial: torch.Tensor, drift: Drift, num_windows: int, *, seed: int
) -> torch.Tensor:
    """Loads of ``num_windows`` successive windows after ``initial``, under ``drift``.

    Args:
        initial: ``[layers, logical]`` non-negative loads of window 0.
        drift: how each window differs from the one before.
        num_windows: windows to generate after the initial one.
        seed: random seed.

    Returns:
        ``[num_windows + 1, layers, logical]`` float64; entry 0 is ``initial``
        and every window keeps ``initial``'s per-layer totals.
    """
    _check_load(initial, "initial")
    if (
        isinstance(num_windows, bool)
        or not isinstance(num_windows, int)  # pyright: ignore[reportUnnecessaryIsInstance]  # callers without a checker
        or num_windows < 0
    ):
        raise WorkloadError(f"num_windows must be an int >= 0, got {num_windows!r}")
    gen = _generator(seed)
    current = initial.detach().to(device="cpu", dtype=torch.float64, copy=True)
    totals = current.sum(dim=1, keepdim=True)
    num_layers, num_logical = current.shape
    if drift.num_hot > num_logical:
        raise WorkloadError(f"{drift.name}: num_hot={drift.num_hot} exceeds {num_logical} experts")
    # The heating experts are drawn once: the same ones keep heating up.
    heating = torch.zeros_like(current, dtype=torch.bool)
    hot = torch.argsort(torch.rand(num_layers, num_logical, generator=gen), dim=1)[
        :, : drift.num_hot
    ]
    heating.scatter_(1, hot, True)
    windows = [current]
    for _ in range(num_windows):
        if drift.kind == "lognormal":
            noise = torch.exp(
                drift.spread * torch.randn(current.shape, generator=gen, dtype=torch.float64)
            )
            current = current * noise
        else:
            current = torch.where(heating, current * drift.spread, current)
        # Keep each layer's token volume: drift moves load between experts only.
        current = current * (totals / current.sum(dim=1, keepdim=True).clamp_min(1e-300))
        windows.append(current)
    return torch.stack(windows)


def sample_step_loads(
    load: torch.Tensor,
    *,
    tokens_per_step: int,
    top_k: int,
    num_steps: int,
    seed: int,
) -> torch.Tensor:
    """Token counts per expert of single forward steps whose expected shares follow ``load``.

    Each step routes ``tokens_per_step * top_k`` token-expert pairs per layer.
    Counts are drawn as independent Poisson variables with those means (the
    large-count limit of a multinomial draw), which is what makes a placement
    planned on window means look less balanced step by step.

    Returns:
        ``[num_steps, layers, logical]`` float64 counts.

    Raises:
        WorkloadError: a bad load or count, or more than ``MAX_WINDOW_ENTRIES``
            counts to draw.
    """
    _check_load(load, "load")
    for what, value in (
        ("tokens_per_step", tokens_per_step),
        ("top_k", top_k),
        ("num_steps", num_steps),
    ):
        if (
            isinstance(value, bool)
            or not isinstance(value, int)  # pyright: ignore[reportUnnecessaryIsInstance]  # callers without a checker
            or value < 1
        ):
            raise WorkloadError(f"{what} must be an int >= 1, got {value!r}")
    shape = (num_steps, int(load.shape[0]), int(load.shape[1]))
    _limits.check_product("sample_step_loads", shape, "MAX_WINDOW_ENTRIES", WorkloadError)
    load = load.detach().to(device="cpu", dtype=torch.float64)
    share = load / load.sum(dim=1, keepdim=True).clamp_min(1e-300)
    mean = (share * float(tokens_per_step * top_k)).expand(num_steps, -1, -1).contiguous()
    return torch.poisson(mean, generator=_generator(seed))
