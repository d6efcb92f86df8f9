"""Stand-ins that let vLLM 0.33's EPLB code run on a CPU-only machine (the `vllm` tier).

vLLM times rearrangements with ``torch.Event``, allocates pinned host memory,
and waits on the current accelerator stream before gloo transfers; CPU has no
timing events, no pinned allocator and no stream, and needs none of them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class NoTimingEvent:
    """``torch.Event`` for CPU: records nothing, every interval is 0 ms."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def record(self, *args: object) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, other: object) -> float:
        return 0.0


class NoStream:
    """The current "accelerator stream" on CPU: nothing is ever pending."""

    def synchronize(self) -> None:
        pass


class TinyModelConfig:
    """The part of vLLM's ``ModelConfig`` that ``EplbState`` reads: a name and a hash."""

    model = "tiny-vlm"

    def compute_hash(self) -> str:
        return "tiny-vlm"


def install(setattr_: Callable[[object, str, object], None]) -> None:
    """Put the stand-ins in place with ``setattr_`` (``setattr``, or a monkeypatch's)."""
    from vllm.distributed.eplb import eplb_communicator, eplb_state

    setattr_(torch, "Event", NoTimingEvent)
    setattr_(torch.accelerator, "current_stream", lambda device=None: NoStream())
    setattr_(eplb_state, "PIN_MEMORY", False)
    setattr_(eplb_communicator, "PIN_MEMORY", False)


def init_gloo_ep(world_size: int, rank: int, port: int) -> None:
    """vLLM's distributed environment on gloo, with EP and EPLB groups over every rank."""
    from vllm.distributed import parallel_state

    parallel_state.init_distributed_environment(
        world_size=world_size,
        rank=rank,
        distributed_init_method=f"tcp://127.0.0.1:{port}",
        local_rank=rank,
        backend="gloo",
    )
    for name in ("_EP", "_EPLB"):
        group = parallel_state.init_model_parallel_group(
            [list(range(world_size))],
            rank,
            "gloo",
            group_name=name.strip("_").lower(),
            use_device_communicator=False,
        )
        setattr(parallel_state, name, group)
