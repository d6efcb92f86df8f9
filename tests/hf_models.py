"""Tiny random-config transformers MoE models, one per family, built offline (no hub access).

Each family says how to build it, how to run text through it, and what its
config asked for (MoE layers, experts, top-k, groups), so tests can compare
what the adapter reports against what the model was built with. Import only
after ``pytest.importorskip("transformers")``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import attrs
import torch
import transformers as tf
from torch import Tensor, nn

from moe_protocols.models._tiny_hf import tiny_qwen3_moe, tiny_qwen3_vl_moe

HIDDEN: Final = 32
VOCAB: Final = 128

# Any: the values go to transformers config constructors, each typed per keyword.
_TEXT: Final[dict[str, Any]] = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 64,
}


def _text(**overrides: Any) -> dict[str, Any]:
    return {**_TEXT, **overrides}


def _seeded(build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build()
    set_implementation = getattr(model, "set_experts_implementation", None)
    if callable(set_implementation) and any(hasattr(m, "is_transposed") for m in model.modules()):
        set_implementation("grouped_mm")
    return model.eval()


def logits_of(output: object) -> Tensor:
    """The logits of a transformers model output."""
    logits = getattr(output, "logits", None)
    assert isinstance(logits, Tensor)
    return logits


def _call(model: nn.Module, ids: Tensor) -> Tensor:
    return logits_of(model(input_ids=ids))


def _call_language_model(model: nn.Module, ids: Tensor) -> Tensor:
    # transformers 5.24's Llama4ForConditionalGeneration.forward always fails
    # (it reads `image_outputs` off its language model's MoeCausalLMOutputWithPast),
    # so run the text path it would take: its language model on the token ids.
    language_model = model.language_model
    assert isinstance(language_model, nn.Module)
    return _call(language_model, ids)


@attrs.frozen
class Family:
    """One MoE family: how to build and run it, and what its config asked for."""

    name: str
    build: Callable[[], nn.Module]
    num_moe_layers: int
    num_experts: int
    top_k: int
    num_groups: int = 1
    num_shared_experts: int = 0
    resolved_path: str = "model -> hf-experts adapter"
    """Where ``MoEView`` finds the MoE model (the adapter), as the trace prints it."""
    run: Callable[[nn.Module, Tensor], Tensor] = _call
    """``run(model, input_ids) -> logits`` through the served (outermost) model."""


def qwen3_moe() -> nn.Module:
    return _seeded(
        lambda: tiny_qwen3_moe(
            hidden_size=HIDDEN, num_layers=2, num_experts=8, top_k=2, vocab_size=VOCAB
        )
    )


def mixtral() -> nn.Module:
    config = tf.MixtralConfig(**_text(head_dim=16, num_local_experts=4, num_experts_per_tok=2))
    return _seeded(lambda: tf.MixtralForCausalLM(config))


def olmoe() -> nn.Module:
    config = tf.OlmoeConfig(
        **_text(num_experts=8, num_experts_per_tok=2, eos_token_id=1, pad_token_id=0)
    )
    return _seeded(lambda: tf.OlmoeForCausalLM(config))


def deepseek_v3() -> nn.Module:
    config = tf.DeepseekV3Config(
        **_text(
            num_hidden_layers=3,
            first_k_dense_replace=1,
            moe_intermediate_size=16,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=4,
            topk_group=2,
            n_shared_experts=1,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
    )
    return _seeded(lambda: tf.DeepseekV3ForCausalLM(config))


def gpt_oss() -> nn.Module:
    config = tf.GptOssConfig(
        **_text(
            head_dim=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=8,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
    )
    return _seeded(lambda: tf.GptOssForCausalLM(config))


def qwen3_vl_moe() -> nn.Module:
    return _seeded(
        lambda: tiny_qwen3_vl_moe(
            hidden_size=HIDDEN, num_layers=2, num_experts=8, top_k=2, vocab_size=VOCAB
        )
    )


def glm4v_moe() -> nn.Module:
    config = tf.Glm4vMoeConfig(
        text_config=_text(
            num_hidden_layers=3,
            first_k_dense_replace=1,
            moe_intermediate_size=16,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            n_shared_experts=1,
            # head_dim 16 with partial_rotary_factor 0.5 rotates 8 dims = 4 frequencies.
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [1, 1, 2],
                "partial_rotary_factor": 0.5,
            },
        ),
        vision_config={
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": HIDDEN,
            "patch_size": 4,
            "image_size": 16,
        },
    )
    return _seeded(lambda: tf.Glm4vMoeForConditionalGeneration(config))


def llama4_vlm() -> nn.Module:
    config = tf.Llama4Config(
        text_config=_text(
            head_dim=16,
            intermediate_size_mlp=64,
            num_local_experts=4,
            num_experts_per_tok=1,
            attention_chunk_size=16,
        ),
        vision_config={
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "vision_output_dim": 32,
            "image_size": 16,
            "patch_size": 4,
            "projector_input_dim": 32,
            "projector_output_dim": HIDDEN,
        },
    )
    return _seeded(lambda: tf.Llama4ForConditionalGeneration(config))


def qwen2_moe() -> nn.Module:
    config = tf.Qwen2MoeConfig(
        **_text(
            moe_intermediate_size=16,
            shared_expert_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=2,
        )
    )
    return _seeded(lambda: tf.Qwen2MoeForCausalLM(config))


def granitemoe() -> nn.Module:
    config = tf.GraniteMoeConfig(**_text(num_local_experts=4, num_experts_per_tok=2))
    return _seeded(lambda: tf.GraniteMoeForCausalLM(config))


def phimoe() -> nn.Module:
    config = tf.PhimoeConfig(**_text(num_local_experts=4, num_experts_per_tok=2))
    return _seeded(lambda: tf.PhimoeForCausalLM(config))


def jamba() -> nn.Module:
    config = tf.JambaConfig(
        **_text(
            num_experts=4,
            num_experts_per_tok=2,
            expert_layer_period=1,
            expert_layer_offset=0,
            attn_layer_period=2,
            attn_layer_offset=1,
            mamba_d_state=4,
            mamba_dt_rank=4,
        )
    )
    return _seeded(lambda: tf.JambaForCausalLM(config))


def gemma4_text() -> nn.Module:
    # The MoE variant: router and experts sit on the decoder layer, beside a dense MLP.
    config = tf.Gemma4TextConfig(
        **_text(
            head_dim=16,
            enable_moe_block=True,
            num_experts=4,
            top_k_experts=2,
            moe_intermediate_size=16,
            hidden_size_per_layer_input=8,
            vocab_size_per_layer_input=VOCAB,
            layer_types=["full_attention"] * 2,
        )
    )
    return _seeded(lambda: tf.Gemma4ForCausalLM(config))


def aria_text() -> nn.Module:
    # Transposed, concatenated experts ([E, H, 2I]).
    config = tf.AriaTextConfig(
        **_text(
            head_dim=16,
            moe_num_experts=4,
            moe_topk=2,
            moe_intermediate_size=16,
            moe_num_shared_experts=1,
        )
    )
    return _seeded(lambda: tf.AriaTextForCausalLM(config))


def ernie4_5_moe() -> nn.Module:
    config = tf.Ernie4_5_MoeConfig(
        **_text(
            head_dim=16,
            moe_num_experts=4,
            moe_k=2,
            moe_intermediate_size=16,
            moe_num_shared_experts=2,
            moe_layer_start_index=0,
        )
    )
    return _seeded(lambda: tf.Ernie4_5_MoeForCausalLM(config))


VLM_PATH: Final = "model.model.language_model -> hf-experts adapter"

REQUIRED_FAMILIES: Final = (
    Family("qwen3_moe", qwen3_moe, 2, 8, 2),
    Family("mixtral", mixtral, 2, 4, 2),
    Family("olmoe", olmoe, 2, 8, 2),
    Family("deepseek_v3", deepseek_v3, 2, 8, 2, num_groups=4, num_shared_experts=1),
    Family("gpt_oss", gpt_oss, 2, 4, 2),
    Family("qwen3_vl_moe", qwen3_vl_moe, 2, 8, 2, resolved_path=VLM_PATH),
    Family(
        "glm4v_moe", glm4v_moe, 2, 8, 2, num_groups=2, num_shared_experts=1, resolved_path=VLM_PATH
    ),
    Family(
        "llama4_vlm",
        llama4_vlm,
        2,
        4,
        1,
        num_shared_experts=1,
        resolved_path="model.language_model -> hf-experts adapter",
        run=_call_language_model,
    ),
)
"""The families the issue names."""

OTHER_STANDARD_FAMILIES: Final = (
    Family("qwen2_moe", qwen2_moe, 2, 8, 2, num_shared_experts=1),
    Family("granitemoe", granitemoe, 2, 4, 2),
    Family("phimoe", phimoe, 2, 4, 2),
    Family("jamba", jamba, 2, 4, 2),
    Family("gemma4_text", gemma4_text, 2, 4, 2),
    Family("aria_text", aria_text, 2, 4, 2, num_shared_experts=1),
    Family("ernie4_5_moe", ernie4_5_moe, 2, 4, 2, num_shared_experts=2),
)
"""More families that follow the standard experts convention; no adapter code names them."""

FAMILIES: Final = REQUIRED_FAMILIES + OTHER_STANDARD_FAMILIES
