"""verify_eplb_integration: the self-test a model author runs before serving with EPLB.

The models here are written the way an outside author would write them: plain
``nn.Module``\\ s that implement the protocol members by hand, not the
project's reference models. Each buggy variant carries one mistake that
``verify`` must name, with the layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from author_models import AuthorMoELayer, AuthorMoELM
from torch import Tensor, nn

from moe_protocols import (
    CheckStatus,
    VerificationCheck,
    VerificationInputError,
    VerificationReport,
    outputs_difference,
    verify_eplb_integration,
)
from moe_protocols.models import tiny_moe, tiny_vlm

# ---------------------------------------------------------------- an outside author's model


class VocabLM(AuthorMoELM):
    """The outside author's LM (``tests/author_models.py``), with its embedding exposed."""

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed


class CopiesMapsLayer(AuthorMoELayer):
    """Bug: keeps copies of the maps, so it never sees EPLB's moves."""

    def set_eplb_state(
        self,
        moe_layer_idx: int,
        expert_load_view: Tensor,
        logical_to_physical_map: Tensor,
        logical_replica_count: Tensor,
    ) -> None:
        super().set_eplb_state(
            moe_layer_idx,
            expert_load_view,
            logical_to_physical_map.clone(),
            logical_replica_count.clone(),
        )


def with_bug(layer: nn.Module, bug: type[AuthorMoELayer]) -> None:
    """Give one built layer a buggy method (keeps its weights, so the model stays seeded)."""
    layer.__class__ = bug


def _state_bytes(model: nn.Module) -> dict[str, bytes]:
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {
        name: bytes(t.detach().contiguous().view(torch.uint8).reshape(-1).tolist())
        for name, t in tensors.items()
    }


def _failures(report: VerificationReport, name: str) -> list[VerificationCheck]:
    return [c for c in report.named(name) if c.status is CheckStatus.FAILED]


@pytest.fixture
def snapshot_guard() -> Iterator[Callable[[nn.Module], None]]:
    """Register a model; afterwards assert every parameter/buffer is back, bit for bit."""
    watched: list[tuple[nn.Module, dict[str, bytes]]] = []
    yield lambda model: watched.append((model, _state_bytes(model)))
    for model, before in watched:
        assert _state_bytes(model) == before


# ---------------------------------------------------------------- correct models pass


def test_a_correct_outside_model_passes_every_check(
    snapshot_guard: Callable[[nn.Module], None],
) -> None:
    model = VocabLM()
    snapshot_guard(model)
    report = verify_eplb_integration(model)
    assert report.ok, str(report)
    statuses = {c.name: c.status for c in report.checks}
    for name in (
        "load-counts",
        "replicas",
        "metadata",
        "move-permute:outputs",
        "move-permute:maps",
        "move-replicas:outputs",
        "move-replicas:maps",
        "restore",
    ):
        assert statuses[name] is CheckStatus.PASSED, str(report)
    assert "bit-exact" in str(report)
    assert "16 tokens x top_k 2 = 32" not in str(report)  # 2x32 synthesised tokens, not 16
    assert "64 tokens x top_k 2 = 128" in str(report)


def test_tiny_vlm_passes_and_reports_the_replica_move_as_skipped() -> None:
    report = verify_eplb_integration(tiny_vlm())
    assert report.ok, str(report)
    (skip,) = report.named("move-replicas")
    assert skip.status is CheckStatus.SKIPPED
    assert "no redundant slots" in skip.observed
    assert "model.get_language_model()" in str(report)


def test_wrapped_and_redundant_tiny_model_passes_and_is_restored_bit_for_bit(
    snapshot_guard: Callable[[nn.Module], None],
) -> None:
    model = tiny_vlm(num_experts=8, num_redundant_experts=4)
    snapshot_guard(model)
    report = verify_eplb_integration(model)
    assert report.ok, str(report)
    assert report.named("move-replicas:outputs")[0].status is CheckStatus.PASSED


class CompiledLike(nn.Module):
    """What torch.compile returns, structurally: the model under ``_orig_mod``.

    torch.compile itself passes too (checked by hand: ~25 s of compilation on
    this CPU, too slow for the suite).
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self._orig_mod = inner

    def forward(self, *args: object, **kwargs: object) -> object:
        return self._orig_mod(*args, **kwargs)


def test_a_compiled_wrapper_of_the_tiny_model_passes() -> None:
    model = CompiledLike(tiny_vlm(num_redundant_experts=2))
    report = verify_eplb_integration(model)
    assert report.ok, str(report)
    assert "_orig_mod" in (report.resolved or "")
    # layer paths are found below the served object
    assert report.named("move-permute:maps")[0].status is CheckStatus.PASSED


# ---------------------------------------------------------------- buggy models are caught


def test_a_layer_keeping_copies_of_the_maps_is_named(
    snapshot_guard: Callable[[nn.Module], None],
) -> None:
    model = VocabLM()
    with_bug(model.blocks[1], CopiesMapsLayer)
    snapshot_guard(model)
    report = verify_eplb_integration(model)
    assert not report.ok
    assert _failures(report, "move-permute:outputs")
    (maps,) = _failures(report, "move-permute:maps")
    assert maps.layer == 1
    assert maps.layer_path == "layers.1"
    assert "copies of the maps" in maps.observed
    assert "MoE layer 1 (layers.1)" in str(report)
    assert report.named("restore")[0].status is CheckStatus.PASSED


def test_redundant_slots_with_independent_weights_are_named(
    snapshot_guard: Callable[[nn.Module], None],
) -> None:
    model = VocabLM(independent_replicas=(0,))
    snapshot_guard(model)
    report = verify_eplb_integration(model)
    (failure,) = _failures(report, "replicas")
    assert failure.layer == 0
    assert failure.layer_path == "layers.0"
    assert "slot 8 should be a copy of logical expert 0" in failure.observed
    assert "p % E" in (failure.fix or "")
    # moving mismatched "replicas" would change the model: the moves are skipped, and say why
    (skip,) = report.named("move-permute")
    assert skip.status is CheckStatus.SKIPPED
    assert "not replicas" in skip.observed


def test_a_layer_counting_every_assignment_twice_is_named() -> None:
    model = VocabLM()
    model.blocks[1].load_sign = 2  # adds each assignment twice
    report = verify_eplb_integration(model)
    (failure,) = _failures(report, "load-counts")
    assert failure.layer == 1
    assert "recorded 256 token-expert assignments for 64 tokens x top_k 2 = 128" in failure.observed
    assert "twice" in (failure.fix or "")


def test_a_layer_that_never_writes_its_load_row_is_named() -> None:
    report = verify_eplb_integration(VocabLM(silent_layers=(0,)))
    (failure,) = _failures(report, "load-counts")
    assert failure.layer == 0
    assert failure.layer_path == "layers.0"
    assert "never writes its row of expert_load_view" in failure.observed


def test_without_top_k_layers_are_checked_against_each_other() -> None:
    model = VocabLM()
    for layer in model.blocks:
        layer.top_k = torch.tensor(2)  # type: ignore[assignment]  # not an int: the probe cannot read it
    model.blocks[2].load_sign = 2
    report = verify_eplb_integration(model)
    (failure,) = _failures(report, "load-counts")
    assert failure.layer == 2
    assert "recorded 256 assignments where most layers recorded 128" in failure.observed
    assert "expose top_k" in (failure.fix or "")


# ---------------------------------------------------------------- Hugging Face models


def test_a_hugging_face_model_reports_the_moves_skipped_and_why() -> None:
    pytest.importorskip("transformers")
    from hf_models import qwen3_moe

    model = qwen3_moe()
    report = verify_eplb_integration(model)
    assert report.ok, str(report)
    assert report.named("load-counts")[0].status is CheckStatus.PASSED
    for name in ("move-permute", "move-replicas"):
        (skip,) = report.named(name)
        assert skip.status is CheckStatus.SKIPPED
        assert "transformers routes every token to the weights at its logical id" in skip.observed
    # the adapter's load hooks are removed again
    assert all(not m._forward_pre_hooks for m in model.modules())


class IdentityOnlyModel(VocabLM):
    """Routes by logical id, like transformers: refuses any placement but the identity."""

    def __init__(self) -> None:
        super().__init__(num_redundant=0)

    def set_eplb_state(
        self,
        expert_load_view: Tensor,
        logical_to_physical_map: Tensor,
        logical_replica_count: Tensor,
    ) -> None:
        identity = torch.arange(self.num_logical_experts)
        if not bool((logical_to_physical_map[:, :, 0] == identity).all()):
            raise ValueError("this model routes by logical id: only the identity placement")
        super().set_eplb_state(expert_load_view, logical_to_physical_map, logical_replica_count)


def test_a_model_that_cannot_move_experts_passes_with_the_moves_skipped(
    snapshot_guard: Callable[[nn.Module], None],
) -> None:
    model = IdentityOnlyModel()
    snapshot_guard(model)
    report = verify_eplb_integration(model)
    assert report.ok, str(report)
    assert report.named("load-counts")[0].status is CheckStatus.PASSED
    for name in ("move-permute", "move-replicas"):
        (skip,) = report.named(name)
        assert skip.status is CheckStatus.SKIPPED
    assert "only the identity placement" in report.named("move-permute")[0].observed


# ---------------------------------------------------------------- ownership


def test_a_model_a_live_state_balances_is_refused_and_left_alone() -> None:
    from moe_protocols import EplbConfig, EplbState, MoEView

    model = tiny_moe(num_redundant_experts=2)
    serving = EplbState(EplbConfig(num_redundant_experts=2))
    serving.add_model(MoEView.require(model), "served")
    report = verify_eplb_integration(model)
    (failure,) = _failures(report, "register")
    assert "'served'" in failure.observed
    assert "before registering" in (failure.fix or "")
    # the serving state still receives the model's load
    model(torch.zeros(1, 4, dtype=torch.long))
    assert int(serving.model_state("served").expert_load_pass.sum()) == 3 * 4 * 2


def test_after_verify_the_model_can_be_registered_for_serving(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from moe_protocols import EplbConfig, EplbState, MoEView
    from moe_protocols.verification import _verifier

    private: list[EplbState] = []  # kept alive: garbage collection must not be what releases

    def keep_alive(*args: object, **kwargs: object) -> EplbState:
        private.append(EplbState(*args, **kwargs))  # type: ignore[arg-type]  # forwarding the patched constructor's arguments
        return private[-1]

    monkeypatch.setattr(_verifier, "EplbState", keep_alive)
    model = tiny_moe(num_redundant_experts=2)
    assert verify_eplb_integration(model).ok
    assert private
    assert all(state.model_names == () for state in private)
    serving = EplbState(EplbConfig(num_redundant_experts=2))
    serving.add_model(MoEView.require(model), "served")
    model(torch.zeros(1, 4, dtype=torch.long))
    assert int(serving.model_state("served").expert_load_pass.sum()) == 3 * 4 * 2


# ---------------------------------------------------------------- inputs and bad usage


def test_sample_inputs_may_be_a_tensor_a_mapping_or_a_factory() -> None:
    ids = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(1))
    for given in (ids, {"input_ids": ids}, lambda: ids):
        report = verify_eplb_integration(AuthorMoELM(), given)
        assert report.ok, str(report)
        assert "15 tokens x top_k 2 = 30" in str(report)


def test_a_model_without_vocabulary_needs_sample_inputs() -> None:
    with pytest.raises(VerificationInputError, match="pass sample_inputs="):
        verify_eplb_integration(AuthorMoELM())
    assert verify_eplb_integration(AuthorMoELM(), torch.zeros(1, 4, dtype=torch.long)).ok


@pytest.mark.parametrize("bad", ["tokens", 3, [1, 2]])
def test_unusable_sample_inputs_are_a_typed_error(bad: object) -> None:
    with pytest.raises(VerificationInputError, match="sample_inputs must be"):
        verify_eplb_integration(VocabLM(), bad)  # type: ignore[arg-type]  # deliberately not sample inputs


def test_a_failing_inputs_factory_is_a_typed_error() -> None:
    def broken() -> Tensor:
        raise RuntimeError("no tokenizer")

    with pytest.raises(VerificationInputError, match="no tokenizer"):
        verify_eplb_integration(VocabLM(), broken)


@pytest.mark.parametrize(
    ("option", "value"),
    [("rtol", -1.0), ("atol", "tiny"), ("seed", -1), ("seed", 2**64), ("max_depth", -1)],
)
def test_out_of_range_options_are_a_typed_error(option: str, value: object) -> None:
    with pytest.raises(VerificationInputError, match=option):
        verify_eplb_integration(VocabLM(), **{option: value})  # type: ignore[arg-type]  # deliberately wrong option values


def test_inputs_the_forward_rejects_are_a_failed_check_not_a_crash() -> None:
    report = verify_eplb_integration(VocabLM(), torch.zeros(4, 4))
    (failure,) = _failures(report, "forward")
    assert "raised" in failure.observed


def test_a_dense_model_fails_resolution_with_the_trace() -> None:
    report = verify_eplb_integration(nn.Linear(2, 2))
    (failure,) = report.checks
    assert failure.name == "resolve"
    assert failure.status is CheckStatus.FAILED
    assert "get_language_model()" in failure.observed
    assert not report.ok


def test_a_nondeterministic_forward_fails_repeatable_and_skips_the_moves() -> None:
    class Noisy(VocabLM):
        def forward(self, input_ids: Tensor) -> Tensor:
            out = super().forward(input_ids)
            return out + torch.randn_like(out)

    report = verify_eplb_integration(Noisy())
    (failure,) = _failures(report, "repeatable")
    assert "model.eval()" in (failure.fix or "")
    assert report.named("move-permute")[0].status is CheckStatus.SKIPPED


def test_tolerant_mode_prints_its_tolerance() -> None:
    report = verify_eplb_integration(tiny_moe(num_redundant_experts=2), exact=False)
    assert report.ok, str(report)
    assert "allclose rtol=0.0001 atol=1e-05 for float32" in str(report)


# ---------------------------------------------------------------- the report and the comparison


def test_the_report_is_a_frozen_value() -> None:
    import attrs

    report = verify_eplb_integration(VocabLM())
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        report.checks = ()  # type: ignore[misc]  # the frozen attribute is what is tested
    assert report.summary == "OK: every check holds"
    assert str(report).splitlines()[0] == "EPLB integration check of VocabLM"


def test_outputs_difference_compares_every_tensor_inside_a_result() -> None:
    logits = torch.ones(2, 3)
    before = {"logits": logits, "hidden": (logits * 2,)}
    assert outputs_difference(before, {"logits": logits.clone(), "hidden": (logits * 2,)}) is None
    nudged = {"logits": logits + 1e-7, "hidden": (logits * 2,)}
    assert "output tensor 0 [2, 3] float32: 6 of 6 elements differ" in (
        outputs_difference(before, nudged) or ""
    )
    assert outputs_difference(before, nudged, exact=False) is None
    moved = {"logits": logits, "hidden": (logits * 3,)}
    assert "output tensor 1" in (outputs_difference(before, moved, exact=False) or "")


def test_a_layer_listed_in_moe_layers_but_never_run_is_named() -> None:
    model = VocabLM()
    stale = AuthorMoELayer(16, 8, 12, 2)
    stale.load_state_dict(model.blocks[1].state_dict())
    model.moe_layers = [model.blocks[0], stale, model.blocks[2]]  # a copy, not the module that runs
    report = verify_eplb_integration(model)
    (failure,) = _failures(report, "load-counts")
    assert failure.layer == 1
    assert "was not called by the forward" in failure.observed
