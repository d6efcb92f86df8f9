"""EPLB is never silently wrong: one owner per layer, no moves on no data, honest figures."""

from __future__ import annotations

import gc
import logging
import math

import pytest
import torch
from author_models import AuthorMoELM, AuthorVLM, tokens

from moe_protocols import MoEView
from moe_protocols.eplb import EplbConfig, EplbState, _transfer
from moe_protocols.errors import (
    EplbConfigError,
    EplbOwnershipError,
    EplbStateError,
    ExpertLoadError,
    TransferError,
)
from moe_protocols.profiling import record_expert_load
from moe_protocols.runner import ReferenceRunner, RunnerConfig

CONFIG = EplbConfig(num_redundant_experts=4, window_size=4, step_interval=1000)


def register(model: AuthorMoELM, name: str = "model", *, ranks: int = 4) -> EplbState:
    state = EplbState(CONFIG, num_ranks=ranks)
    state.add_model(model, name)
    return state


def serve(model: torch.nn.Module, state: EplbState, steps: int = 3) -> None:
    """Forward a few batches whose load is skewed, one ``step()`` each."""
    with torch.no_grad():
        for i in range(steps):
            model(tokens(seed=i))
            state.step()


def _call(model: object, batch: object) -> object:
    assert callable(model)
    return model(batch)


def snapshot(state: EplbState, model: AuthorMoELM) -> dict[str, bytes]:
    live = state.model_state()
    tensors = {
        "p2l": live.physical_to_logical_map,
        "l2p": live.logical_to_physical_map,
        "count": live.logical_replica_count,
        "pass": live.expert_load_pass,
        "window": live.expert_load_window,
        **{f"w{i}": layer.w for i, layer in enumerate(model.blocks)},
    }
    out = {k: t.detach().clone().numpy().tobytes() for k, t in tensors.items()}
    counters = (state.window_step, state.step_counter, state.num_rearrangements)
    out["counters"] = repr(counters).encode()
    return out


# ------------------------------------------------------------------ ownership


def test_a_second_state_is_refused_and_names_the_owner() -> None:
    lm = AuthorMoELM()
    first = register(lm, "served")
    second = EplbState(CONFIG, num_ranks=4)
    with pytest.raises(EplbOwnershipError, match="'served'") as info:
        second.add_model(MoEView.require(AuthorVLM(lm)), "again")
    assert info.value.owner_model_name == "served"
    assert info.value.layers == (0, 1, 2)
    assert second.model_names == ()
    # The owner still records: its layers were never handed other tensors.
    serve(lm, first, steps=1)
    assert int(first.expert_load_window("served").sum()) == 48 * 2 * 3


def test_the_same_state_refuses_the_model_under_a_second_name() -> None:
    lm = AuthorMoELM()
    state = register(lm)
    with pytest.raises(EplbOwnershipError, match="remove_model\\('model'\\)"):
        state.add_model(lm, "other")
    assert state.model_names == ("model",)


def test_a_released_model_can_be_registered_again() -> None:
    lm = AuthorMoELM()
    first = register(lm)
    first.remove_model("model")
    second = register(lm)
    serve(lm, second, steps=1)
    assert int(second.expert_load_window().sum()) == 48 * 2 * 3
    with pytest.raises(EplbStateError, match="no model named"):
        first.remove_model("model")


def test_closing_a_state_or_dropping_it_releases_its_models() -> None:
    lm = AuthorMoELM()
    with EplbState(CONFIG, num_ranks=4) as state:
        state.add_model(lm)
    register(lm).close()
    dropped = register(lm)
    del dropped
    gc.collect()
    register(lm)  # nobody holds the layers any more


def test_a_dropped_state_releases_its_models_without_the_cycle_collector() -> None:
    """Nothing in a state refers back to it (its policy is asked through a partial, not a
    bound method), so dropping the last reference frees it at once, as CPython users expect."""
    lm = AuthorMoELM()
    gc.collect()
    gc.disable()
    try:
        dropped = register(lm)
        serve(lm, dropped, steps=1)
        del dropped
        second = register(lm)  # no gc.collect(): the claim went with the last reference
    finally:
        gc.enable()
    assert second.model_names == ("model",)


def test_a_second_runner_cannot_detach_the_first() -> None:
    lm = AuthorMoELM()
    config = RunnerConfig(enable_eplb=True, eplb=CONFIG, num_ranks=4)
    first = ReferenceRunner(config)
    first.load_model(AuthorVLM(lm))
    with pytest.raises(EplbOwnershipError):
        ReferenceRunner(config).load_model(AuthorVLM(lm))
    first.execute_model(tokens())
    state = first.eplb_state
    assert state is not None
    assert int(state.expert_load_window().sum()) == 48 * 2 * 3


def test_two_adapters_over_the_same_weights_collide() -> None:
    lm = AuthorMoELM()
    owner = register(lm)

    class SameWeights:
        """A second adapter object: other layer objects, the same weight tensors."""

        def __init__(self, inner: AuthorMoELM) -> None:
            self.__dict__.update(
                {k: getattr(inner, k) for k in vars(inner) if k.startswith("num_")}
            )
            self.moe_layers = [Layer(layer) for layer in inner.blocks]
            self.expert_weights = [layer.get_expert_weights() for layer in inner.blocks]

        def set_eplb_state(
            self,
            expert_load_view: torch.Tensor,
            logical_to_physical_map: torch.Tensor,
            logical_replica_count: torch.Tensor,
        ) -> None:
            raise AssertionError("must be refused before set_eplb_state")

        def update_physical_experts_metadata(
            self, num_physical_experts: int, num_local_physical_experts: int
        ) -> None:
            raise AssertionError("unused")

    class Layer:
        def __init__(self, inner: torch.nn.Module) -> None:
            self.inner = inner

        def get_expert_weights(self) -> list[torch.Tensor]:
            return [self.inner.w]  # type: ignore[list-item]  # nn.Module attribute lookup

        def set_eplb_state(
            self,
            moe_layer_idx: int,
            expert_load_view: torch.Tensor,
            logical_to_physical_map: torch.Tensor,
            logical_replica_count: torch.Tensor,
        ) -> None:
            raise AssertionError("must be refused before set_eplb_state")

    with pytest.raises(EplbOwnershipError, match="layers \\[0, 1, 2\\]"):
        EplbState(CONFIG, num_ranks=4).add_model(SameWeights(lm))  # type: ignore[arg-type]  # deliberately not a MixtureOfExperts
    assert owner.model_names == ("model",)


def test_profiling_a_live_model_borrows_its_layers_and_gives_them_back() -> None:
    lm, reference = AuthorMoELM(), AuthorMoELM()
    state = register(lm)
    serve(lm, state, steps=3)
    state.rearrange()
    assert state.last_rearrangement is not None
    assert state.last_rearrangement.slots_changed > 0
    before = snapshot(state, lm)

    profiled = record_expert_load(AuthorVLM(lm), [tokens(seed=9)], forward=_call)

    # Profiled under the live placement: every token-expert assignment is counted.
    assert profiled.shape == (3, 8)
    assert int(profiled.sum()) == 48 * 2 * 3
    assert snapshot(state, lm) == before  # nothing of the owner's was touched
    # ...and the owner records and routes exactly as before.
    with torch.no_grad():
        assert torch.allclose(lm(tokens(seed=5)), reference(tokens(seed=5)), atol=1e-5)
    state.step()
    assert int(state.expert_load_window().sum()) == 48 * 2 * 3
    # Its next rearrangement still keeps the outputs.
    serve(lm, state, steps=2)
    state.rearrange()
    with torch.no_grad():
        assert torch.allclose(lm(tokens(seed=6)), reference(tokens(seed=6)), atol=1e-5)


def test_profiling_counts_match_the_owners_own_recording() -> None:
    lm = AuthorMoELM()
    state = register(lm)
    serve(lm, state, steps=2)
    state.rearrange()
    profiled = record_expert_load(lm, [tokens(seed=3)], forward=_call)
    with torch.no_grad():
        lm(tokens(seed=3))
    physical = state.model_state().expert_load_pass.to(torch.int64)
    p2l = state.physical_to_logical_map()
    owned = torch.zeros(3, 8, dtype=torch.int64).scatter_add_(1, p2l, physical)
    assert torch.equal(profiled, owned)


# ------------------------------------------------------------------ no action on no data


def test_an_empty_window_moves_nothing_and_reads_as_no_data(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lm = AuthorMoELM(silent_layers=(0, 1, 2))
    state = register(lm)
    serve(lm, state, steps=3)
    stats = state.balancedness()
    assert not stats.has_data
    assert math.isnan(stats.overall)
    assert math.isnan(stats.token_weighted)
    assert "no data" in str(stats)
    before = snapshot(state, lm)
    with caplog.at_level(logging.WARNING, logger="moe_protocols.eplb"):
        result = state.rearrange()
        serve(lm, state, steps=1)
        again = state.rearrange()
    summary = result["model"]
    assert result.skipped
    assert again.skipped
    assert summary.skipped is not None
    assert "no load" in summary.skipped
    assert summary.slots_changed == 0
    assert summary.bytes_moved == 0
    assert math.isnan(summary.overall_balancedness_after)
    assert not summary.has_data
    # Weights and maps unchanged (the window was empty anyway).
    after = snapshot(state, lm)
    assert {k: v for k, v in after.items() if k != "counters"} == {
        k: v for k, v in before.items() if k != "counters"
    }
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # logged once, not on every rearrangement
    assert "'model'" in warnings[0].getMessage()


def test_a_layer_that_never_records_keeps_its_placement(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lm = AuthorMoELM(silent_layers=(1,))
    state = register(lm)
    serve(lm, state, steps=3)
    old = state.physical_to_logical_map()
    with caplog.at_level(logging.WARNING, logger="moe_protocols.eplb"):
        result = state.rearrange()
    summary = result["model"]
    new = state.physical_to_logical_map()
    assert summary.layers_without_load == (1,)
    assert torch.equal(new[1], old[1])
    assert not torch.equal(new[0], old[0])  # the recording layers were balanced
    assert math.isnan(float(summary.balancedness_after[1]))
    assert not math.isnan(summary.overall_balancedness_after)
    assert any("MoE layers [1]" in r.getMessage() for r in caplog.records)
    assert "layers [1] recorded no load" in str(summary)


def test_negative_load_is_refused_naming_the_layer_and_changes_nothing() -> None:
    lm = AuthorMoELM(negative_layers=(2,))
    state = register(lm)
    serve(lm, state, steps=2)
    before = snapshot(state, lm)
    with pytest.raises(ExpertLoadError, match="MoE layer\\(s\\) \\[2\\]") as info:
        state.rearrange()
    assert info.value.layers == (2,)
    assert snapshot(state, lm) == before


# ------------------------------------------------------------------ honest figures


def test_a_rearrangement_reports_realised_and_planned_balancedness(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lm = AuthorMoELM()
    state = register(lm)
    serve(lm, state, steps=3)
    measured = state.balancedness().overall
    first = state.rearrange()["model"]
    assert first.has_data
    assert first.total_load == 3 * 48 * 2 * 3
    assert first.realised_balancedness == pytest.approx(measured)
    assert first.previous_planned_balancedness is None
    assert first.overall_balancedness_after > first.overall_balancedness_before
    serve(lm, state, steps=3)
    with caplog.at_level(logging.INFO, logger="moe_protocols.eplb"):
        second = state.rearrange()["model"]
    assert second.previous_planned_balancedness == first.overall_balancedness_after
    line = next(r.getMessage() for r in caplog.records if "rearranged" in r.getMessage())
    assert "realised" in line
    assert "planned" in line
    assert "B written" in line  # bytes in human units


# ------------------------------------------------------------------ fingerprints


def test_redundant_slots_that_are_not_replicas_are_refused() -> None:
    lm = AuthorMoELM(independent_replicas=(1,))
    state = EplbState(CONFIG, num_ranks=4)
    with pytest.raises(EplbStateError, match=r"MoE layer 1, slot 8 .*logical expert 0"):
        state.add_model(lm)
    assert state.model_names == ()
    EplbState(CONFIG, num_ranks=4, integrity="off").add_model(lm)  # the check can be turned off


def test_an_unknown_integrity_mode_is_a_config_error() -> None:
    with pytest.raises(EplbConfigError, match="integrity must be one of"):
        EplbState(CONFIG, integrity="most")  # type: ignore[arg-type]  # deliberately not an IntegrityMode


def test_a_staged_row_of_the_wrong_expert_is_refused_before_the_commit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lm = AuthorMoELM()
    state = register(lm)
    serve(lm, state)
    before = snapshot(state, lm)
    real = _transfer._stage_layer

    def torn(plan: object, weights: object) -> object:
        staged = real(plan, weights)  # type: ignore[arg-type]  # the patched function's own arguments
        staged.rows[0][0].add_(1.0)  # a bug that stages a row of other bytes
        return staged

    monkeypatch.setattr(_transfer, "_stage_layer", torn)
    with pytest.raises(TransferError, match="nothing was committed") as info:
        state.rearrange()
    assert info.value.layer is not None
    assert snapshot(state, lm) == before


def test_a_commit_that_lands_in_the_wrong_slot_is_rolled_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lm = AuthorMoELM()
    state = register(lm)
    serve(lm, state)
    before = snapshot(state, lm)
    real = _transfer._StagedLayer.commit

    def misplaced(self: _transfer._StagedLayer, weights: list[torch.Tensor]) -> None:
        real(self, weights)
        # A commit bug: one written slot ends up with the row meant for another.
        first, last = self.written_slots[0], self.written_slots[-1]
        weights[0][first].copy_(weights[0][last] + 1.0)

    monkeypatch.setattr(_transfer._StagedLayer, "commit", misplaced)
    with pytest.raises(TransferError, match="written to local slot"):
        state.rearrange()
    assert snapshot(state, lm) == before  # weights put back, maps never committed


@pytest.mark.parametrize("kind", ["expanded", "overlapping", "shared"])
def test_expert_weights_that_alias_are_refused_at_registration(kind: str) -> None:
    lm = AuthorMoELM()
    layer = lm.blocks[1]
    slots, hidden = layer.w.shape[0], layer.w.shape[1]
    if kind == "expanded":
        aliased = layer.w.detach()[:1].expand(slots, -1, -1)
    elif kind == "overlapping":
        base = torch.randn(slots * hidden * hidden)
        aliased = base.as_strided((slots, hidden, hidden), (hidden * hidden // 2, hidden, 1))
    else:
        aliased = lm.blocks[0].w.detach()
    lm.expert_weights[1] = [aliased]
    with pytest.raises(EplbStateError, match="share memory"):
        EplbState(CONFIG, num_ranks=4, integrity="off").add_model(lm)


def test_moves_that_keep_every_fingerprint_pass_in_every_mode() -> None:
    for mode in ("sampled", "full"):
        lm, reference = AuthorMoELM(), AuthorMoELM()
        state = EplbState(CONFIG, num_ranks=4, integrity=mode)
        state.add_model(lm)
        serve(lm, state)
        assert state.rearrange().slots_changed > 0
        for _ in range(2):
            serve(lm, state)
            state.rearrange()
        with torch.no_grad():
            assert torch.allclose(lm(tokens(seed=4)), reference(tokens(seed=4)), atol=1e-5)


def test_changed_weights_are_refused_until_the_fingerprints_are_refreshed() -> None:
    lm = AuthorMoELM()
    state = register(lm)
    serve(lm, state)
    with torch.no_grad():
        for layer in lm.blocks:
            layer.w.mul_(1.5)  # a legitimate weight update, applied to every replica
    before = snapshot(state, lm)
    with pytest.raises(TransferError, match="does not hold the bytes"):
        state.rearrange()
    assert snapshot(state, lm) == before
    state.refresh_fingerprints()
    assert state.rearrange().slots_changed > 0


def test_an_inference_tensor_is_refused_before_anything_is_written() -> None:
    with torch.inference_mode():
        lm = AuthorMoELM()
    state = register(lm)
    serve(lm, state)
    before = snapshot(state, lm)
    with pytest.raises(TransferError, match="inference tensor"):
        state.rearrange()
    assert snapshot(state, lm) == before


@pytest.mark.parametrize("integrity", ["sampled", "off"])
def test_a_commit_that_fails_part_way_is_rolled_back(
    monkeypatch: pytest.MonkeyPatch, integrity: str
) -> None:
    lm = AuthorMoELM()
    state = EplbState(CONFIG, num_ranks=4, integrity=integrity)  # type: ignore[arg-type]  # parametrized with valid modes, typed str
    state.add_model(lm)
    serve(lm, state)
    before = snapshot(state, lm)
    real = _transfer._StagedLayer.commit

    def fails_on_the_last_layer(self: _transfer._StagedLayer, weights: list[torch.Tensor]) -> None:
        real(self, weights)
        if self.layer == 2:
            raise RuntimeError("device lost")

    monkeypatch.setattr(_transfer._StagedLayer, "commit", fails_on_the_last_layer)
    with pytest.raises(TransferError, match="put back") as info:
        state.rearrange()
    assert isinstance(info.value.__cause__, RuntimeError)
    assert snapshot(state, lm) == before
