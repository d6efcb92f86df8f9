"""Tiny random-weight transformers MoE models, built offline from config classes.

For the ``moe-protocols profile`` default, the benchmarks and the tests: no
hub access, no files, a few hundred thousand parameters, milliseconds per
forward on a CPU. transformers is imported inside each factory, so this
module imports without it; calling a factory without transformers raises
``ImportError`` naming the extra to install.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from moe_protocols._torch_typed import fork_rng, manual_seed

if TYPE_CHECKING:
    from types import ModuleType

    from torch import nn

__all__ = ["require_transformers", "tiny_qwen3_moe", "tiny_qwen3_vl_moe"]

_EXPERTS_IMPLEMENTATION: Final = "grouped_mm"
"""Fast on CPU (falls back to a loop of matmuls); ``batched_mm`` is ~30x slower there."""


def require_transformers() -> ModuleType:
    """Import transformers, or raise ``ImportError`` saying how to install it."""
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(
            "this needs Hugging Face transformers, which is not installed; "
            "install the extra: pip install 'moe-protocols[hf]'"
        ) from exc
    return transformers


def _text_kwargs(
    *, hidden_size: int, num_layers: int, num_experts: int, top_k: int, vocab_size: int
) -> dict[str, object]:
    heads = max(1, hidden_size // 16)
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "moe_intermediate_size": hidden_size // 2,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": 1,
        "head_dim": hidden_size // heads,
        "max_position_embeddings": 4096,
        "num_experts": num_experts,
        "num_experts_per_tok": top_k,
    }


def tiny_qwen3_moe(
    *,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_experts: int = 16,
    top_k: int = 2,
    vocab_size: int = 256,
    seed: int = 0,
) -> nn.Module:
    """A random-weight ``Qwen3MoeForCausalLM`` (every layer MoE), in eval mode.

    Raises:
        ImportError: transformers is not installed.
    """
    tf = require_transformers()
    config = tf.Qwen3MoeConfig(
        **_text_kwargs(
            hidden_size=hidden_size,
            num_layers=num_layers,
            num_experts=num_experts,
            top_k=top_k,
            vocab_size=vocab_size,
        )
    )
    with fork_rng():
        manual_seed(seed)
        model: nn.Module = tf.Qwen3MoeForCausalLM(config)
    return _finish(model)


def tiny_qwen3_vl_moe(
    *,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_experts: int = 16,
    top_k: int = 2,
    vocab_size: int = 256,
    seed: int = 0,
) -> nn.Module:
    """A random-weight ``Qwen3VLMoeForConditionalGeneration`` (tiny vision tower), in eval mode.

    The MoE language model sits at ``model.language_model``; text-only
    ``input_ids`` run through the wrapper.

    Raises:
        ImportError: transformers is not installed.
    """
    tf = require_transformers()
    text = _text_kwargs(
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_experts=num_experts,
        top_k=top_k,
        vocab_size=vocab_size,
    )
    head_dim = int(str(text["head_dim"]))
    # Multimodal RoPE splits head_dim / 2 frequencies over (time, height, width).
    half = head_dim // 2
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": [half - 2 * (half // 3), half // 3, half // 3],
    }
    vision = {
        "depth": 1,
        "hidden_size": 32,
        "intermediate_size": 32,
        "num_heads": 2,
        "out_hidden_size": hidden_size,
        "patch_size": 4,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "num_position_embeddings": 16,
        "deepstack_visual_indexes": [0],
    }
    config = tf.Qwen3VLMoeConfig(text_config=text, vision_config=vision)
    with fork_rng():
        manual_seed(seed)
        model: nn.Module = tf.Qwen3VLMoeForConditionalGeneration(config)
    return _finish(model)


def _finish(model: nn.Module) -> nn.Module:
    set_implementation = getattr(model, "set_experts_implementation", None)
    if callable(set_implementation):
        set_implementation(_EXPERTS_IMPLEMENTATION)
    return model.eval()
