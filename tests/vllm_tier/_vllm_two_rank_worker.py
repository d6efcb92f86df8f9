"""One EP rank of the two-rank run in test_vllm_plugin.py (run as a script by that test).

vLLM's distributed environment on gloo, vLLM's EplbState and its torch_gloo
communicator moving the tiny VLM's expert weights between two processes,
once with vLLM's default policy and once with ours through the plugin.
Writes ``rank<N>.json`` into the output folder.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from _vllm_cpu import TinyModelConfig, init_gloo_ep, install


def _run(rank: int, policy: str | None) -> dict[str, object]:
    from vllm.config import EPLBConfig, ParallelConfig
    from vllm.distributed.eplb.eplb_state import EplbState
    from vllm.v1.worker import gpu_model_runner

    from moe_protocols import ExpertParallelContext
    from moe_protocols.eplb import expected_rank_loads, overall_balancedness
    from moe_protocols.integrations import vllm as plugin
    from moe_protocols.models import tiny_vlm

    plugin.unregister()
    if policy is None:
        os.environ.pop(plugin.POLICY_ENV, None)
    else:
        os.environ[plugin.POLICY_ENV] = policy
    plugin.register()
    vlm = tiny_vlm(
        num_experts=16,
        num_redundant_experts=4,
        ep=ExpertParallelContext(world_size=2, rank=rank),
    )
    moe = gpu_model_runner.get_mixture_of_experts_model(vlm)
    config = EPLBConfig(use_async=False, communicator="torch_gloo", window_size=4, step_interval=4)
    state = EplbState(ParallelConfig(eplb_config=config), torch.device("cpu"))
    state.add_model(moe, TinyModelConfig())
    model_state = state.model_states["tiny-vlm"]
    old_map = model_state.physical_to_logical_map.clone()
    ids = torch.randint(0, 12, (4, 24), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        before = vlm(ids)
        state.step()
        after = vlm(ids)
    new_map = model_state.physical_to_logical_map
    load = model_state.last_expert_load  # the [layers, logical] load vLLM planned with
    return {
        "planned_balancedness": overall_balancedness(expected_rank_loads(new_map, load, 2)),
        "old_balancedness": overall_balancedness(expected_rank_loads(old_map, load, 2)),
        "policy": state.policy.__name__,
        "rearranged": state.expert_rearrangement_step == 0,
        "moved": int((new_map != old_map).sum()),
        "slots": new_map.numel(),
        "max_output_change": float((after - before).abs().max()),
        "map": new_map.tolist(),
    }


def main() -> None:
    rank, port, out = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    torch.set_num_threads(1)
    install(setattr)
    init_gloo_ep(2, rank, port)
    results = {policy or "vllm": _run(rank, policy) for policy in (None, "migration_aware")}
    (out / f"rank{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
