"""The sample inputs of a verification run: given, or synthesised from the model's vocabulary."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Final, TypeGuard, cast

import torch
from torch import Tensor

from moe_protocols.adapters._view import MoEView
from moe_protocols.errors import (
    VerificationInputError,
)
from moe_protocols.profiling import (
    Batch,
    vocabulary_size,
    weights_device,
)

if TYPE_CHECKING:
    pass


SampleInputs = Tensor | Mapping[str, object] | Callable[[], object]
"""What ``sample_inputs`` may be: ``input_ids``, forward keywords, or a factory of either."""

SYNTHETIC_SHAPE: Final = (2, 32)
"""``[batch, tokens]`` of the input ids synthesised when no sample inputs are given."""


def is_sample_batch(value: object) -> TypeGuard[Batch]:
    """Whether ``value`` can be fed as it is: a tensor of input_ids or a mapping of keywords."""
    return isinstance(value, (Tensor, Mapping))


def sample_batch(
    root: object, view: MoEView, sample_inputs: SampleInputs | None, seed: int
) -> tuple[Batch, str]:
    """The batch every forward is fed, and how it was obtained."""
    if sample_inputs is None:
        vocab = vocabulary_size(root) or vocabulary_size(view.model)
        if vocab is None:
            raise VerificationInputError(
                f"verify_eplb_integration: no sample inputs were given and none can be "
                f"synthesised: neither {type(root).__name__} nor {type(view.model).__name__} "
                "tells its vocabulary size (get_input_embeddings() or config.vocab_size); pass "
                "sample_inputs= (a tensor, a mapping of forward keywords, or a factory), or "
                "--inputs MODULE:ATTR on the command line"
            )
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab, SYNTHETIC_SHAPE, generator=generator)
        shape = "x".join(map(str, SYNTHETIC_SHAPE))
        return ids.to(weights_device(view)), (
            f"synthesised input_ids [{shape}] from vocab_size={vocab} (seed {seed})"
        )
    given: object = sample_inputs
    if callable(given) and not isinstance(given, (Tensor, Mapping)):
        try:
            given = given()
        except Exception as exc:
            raise VerificationInputError(
                f"verify_eplb_integration: the sample_inputs factory failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    if isinstance(given, Tensor):
        return given, f"input_ids {list(given.shape)} (given)"
    if isinstance(given, Mapping):
        given = cast("Mapping[object, object]", given)
        if all(isinstance(k, str) for k in given):
            batch = {str(k): v for k, v in given.items()}
            return batch, f"forward keywords {sorted(batch)} (given)"
    raise VerificationInputError(
        "verify_eplb_integration: sample_inputs must be a tensor of input_ids, a mapping of "
        f"forward keyword arguments, or a callable returning one; got {type(given).__name__}"
    )


def tokens_in(batch: Batch) -> int | None:
    """Tokens a text-only batch sends through every MoE layer (None: cannot tell from it)."""
    if isinstance(batch, Tensor):
        return batch.numel()
    ids = batch.get("input_ids")
    text_only = set(batch) <= {"input_ids", "attention_mask", "position_ids", "token_type_ids"}
    return ids.numel() if isinstance(ids, Tensor) and text_only else None


def output_tensors(output: object) -> list[Tensor]:
    """Every tensor in a forward's result (tensors, mappings such as ModelOutput, sequences)."""
    if isinstance(output, Tensor):
        return [output.detach().clone()]
    items: list[object]
    if isinstance(output, Mapping):
        items = list(cast("Mapping[object, object]", output).values())
    elif isinstance(output, (list, tuple)):
        items = list(cast("Sequence[object]", output))
    else:
        return []
    return [tensor for item in items for tensor in output_tensors(item)]
