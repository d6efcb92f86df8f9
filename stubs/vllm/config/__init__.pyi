# The few vLLM 0.33 config types EplbState's signatures mention (vLLM defines
# them in vllm.config.parallel and vllm.config.model and re-exports them here).
from typing import Literal

class EPLBConfig:
    window_size: int
    step_interval: int
    num_redundant_experts: int
    log_balancedness: bool
    log_balancedness_interval: int
    use_async: bool
    policy: Literal["default"]

class ParallelConfig:
    enable_eplb: bool
    eplb_config: EPLBConfig

class ModelConfig:
    def compute_hash(self) -> str: ...
