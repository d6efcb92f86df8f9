"""One verification run: the private EPLB state, the forced moves and every check."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Final, final

import attrs
import torch
from torch import Tensor

from moe_protocols._torch_typed import int_list
from moe_protocols.adapters._view import MoEView
from moe_protocols.conformance import check_conformance
from moe_protocols.eplb import EplbConfig, EplbState
from moe_protocols.eplb._maps import compute_logical_maps, initial_placement, max_replicas
from moe_protocols.errors import (
    EplbOwnershipError,
    MoEProtocolsError,
)
from moe_protocols.profiling import (
    Batch,
    weights_device,
)

if TYPE_CHECKING:
    from moe_protocols.eplb._fingerprint import IntegrityMode
    from moe_protocols.eplb._state import ModelEplbState
from moe_protocols.verification._compare import Tolerance, bit_identical, same_bits
from moe_protocols.verification._inputs import output_tensors, tokens_in
from moe_protocols.verification._probes import (
    TokenCounter,
    layer_paths,
    logical_load,
    protocol_default,
    top_k_of,
)
from moe_protocols.verification._report import CheckStatus, VerificationCheck

_MODEL_NAME: Final = "verify"
_NEVER: Final = 2**31 - 1  # step_interval: the private state must never rearrange on its own

_STALE_MAPS: Final = (
    "after the move it still routes by the placement before it: it keeps copies of the maps "
    "handed to set_eplb_state, not the views"
)
_KEEP_VIEWS: Final = (
    "keep the tensors set_eplb_state hands over as they are (no .clone(), .to() or .tolist()); "
    "EPLB updates them in place"
)
_LOGICAL_IDS: Final = "it records load at logical expert ids instead of physical slots"
_LOAD_MOVED: Final = "its load no longer matches the same input's load before the move"
_ROUTE_LIVE: Final = "route logical expert -> physical slot through the live maps on every forward"


@final
class Verifier:
    """One verification run: the private EPLB state, the reference outputs and the results."""

    def __init__(
        self,
        root: object,
        view: MoEView,
        batch: Batch,
        forward: Callable[[object, Batch], object],
        tolerance: Tolerance,
        seed: int,
        exact: bool | None,
    ) -> None:
        self.root, self.view, self.batch, self._forward = root, view, batch, forward
        self.tolerance, self.seed, self.exact = tolerance, seed, exact
        self.checks: list[VerificationCheck] = []
        self.paths = layer_paths(root, view)
        self.num_layers = view.num_moe_layers
        self.num_logical, self.num_physical = view.num_logical_experts, view.num_physical_experts
        self.initial = initial_placement(self.num_layers, self.num_logical, self.num_physical)
        self.reference: list[Tensor] = []
        self.tolerance_reason = ""
        self.reference_load = torch.zeros(0)
        self.state = self._new_state("full")

    def _new_state(self, integrity: IntegrityMode) -> EplbState:
        return EplbState(
            EplbConfig(
                window_size=1,
                step_interval=_NEVER,
                num_redundant_experts=self.view.num_redundant_experts,
            ),
            # layers add their load on the experts' device
            device=weights_device(self.view),
            integrity=integrity,
        )

    # ------------------------------------------------------------ bookkeeping

    def add(
        self,
        name: str,
        status: CheckStatus,
        observed: str,
        *,
        layer: int | None = None,
        fix: str | None = None,
    ) -> None:
        path = None if layer is None else self.paths[layer]
        self.checks.append(VerificationCheck(name, status, observed, layer, path, fix))

    def passed(self, name: str, observed: str) -> None:
        self.add(name, CheckStatus.PASSED, observed)

    def skipped(self, name: str, why: str) -> None:
        self.add(name, CheckStatus.SKIPPED, why)

    def failed(self, name: str, observed: str, fix: str, layer: int | None = None) -> None:
        self.add(name, CheckStatus.FAILED, observed, layer=layer, fix=fix)

    @property
    def live(self) -> ModelEplbState:
        return self.state.model_state(_MODEL_NAME)

    def run_forward(self, name: str, counter: TokenCounter) -> tuple[list[Tensor], Tensor] | None:
        """Outputs and ``[L, P]`` recorded load of one forward; None (a failure) if it raised."""
        counter.reset()
        try:
            with torch.no_grad():
                output = self._forward(self.root, self.batch)
        except Exception as exc:
            self.failed(
                name,
                f"the forward raised {type(exc).__name__}: {exc}",
                "make the model run on the sample inputs (pass sample_inputs=/--inputs, or "
                "forward= for a model not called as model(input_ids=...))",
            )
            return None
        load = self.live.expert_load_pass.to("cpu", torch.int64, copy=True)
        self.state.step()  # moves the pass into the window and zeroes it
        return output_tensors(output), load

    def compare_forward(self, name: str, counter: TokenCounter) -> tuple[str | None, Tensor] | None:
        """A forward compared with the reference: ``(what differs or None, its load)``.

        None (and a failure) when the forward raised.
        """
        result = self.run_forward(name, counter)
        if result is None:
            return None
        return self.tolerance.difference(self.reference, result[0]), result[1]

    def check_outputs(
        self, name: str, counter: TokenCounter, *, changed: str, fix: str, unchanged: str
    ) -> None:
        """One check: a forward's outputs equal the reference's."""
        compared = self.compare_forward(name, counter)
        if compared is None:
            return
        if compared[0] is not None:
            self.failed(name, f"{changed}: {compared[0]}", fix)
        else:
            self.passed(name, unchanged)

    # ------------------------------------------------------------ the checks

    def run(self) -> None:
        report = check_conformance(self.view.model, path=self.view.trace.resolved_path or "model")
        if not report.ok:
            self.failed("counts", str(report), "fix the problems the conformance report lists")
            return
        self.passed(
            "counts",
            f"{self.num_layers} MoE layers, {self.num_logical} logical experts in "
            f"{self.num_physical} physical slots ({self.view.num_redundant_experts} redundant)",
        )
        replicas_ok = self._check_replicas()
        if not replicas_ok:
            # EplbState refuses non-replica slots; register anyway to check the load
            # recording (no move is made, see _why_no_moves).
            self.state = self._new_state("off")
        try:
            self.state.add_model(self.view, _MODEL_NAME)
        except EplbOwnershipError as exc:
            self.failed(
                "register",
                str(exc),
                "verify the model before registering it with your EplbState (or release it "
                "there first); verify never takes layers from a live state",
            )
            return
        except MoEProtocolsError as exc:
            self.failed("register", str(exc), "fix what EplbState.add_model reports")
            return
        self.passed(
            "register",
            f"a private EplbState registered the model (weight integrity checks: "
            f"{self.state.integrity})",
        )
        counter = TokenCounter(self.view.moe_layers)
        try:
            self._run_registered(counter, replicas_ok)
        finally:
            counter.remove()
            self._restore()
            remove_hooks = getattr(self.view.model, "remove_hooks", None)
            if callable(remove_hooks):
                remove_hooks()
            # Release the layers, so that a serving EplbState may register the model now.
            self.state.remove_model(_MODEL_NAME)

    def _run_registered(self, counter: TokenCounter, replicas_ok: bool) -> None:
        first = self.run_forward("forward", counter)
        if first is None:
            return
        tokens = list(counter.tokens)
        second = self.run_forward("forward", counter)
        if second is None:
            return
        self.reference, self.reference_load = first[0], first[1]
        comparable = self._check_repeatable(first[0], second[0])
        self._check_load(first[1], second[1], tokens)
        if comparable:
            self._check_metadata(counter)
        else:
            self.skipped("metadata", "outputs cannot be compared (see 'repeatable')")
        why_not = self._why_no_moves(comparable, replicas_ok)
        for name, placement, text in self._moves():
            if why_not is not None or placement is None:
                self.skipped(name, why_not or text)
                continue
            if not self._check_move(name, placement, text, counter):
                break
        self._restore()
        self._check_restored(counter)

    def _check_repeatable(self, first: list[Tensor], second: list[Tensor]) -> bool:
        name = "repeatable"
        if not first:
            self.skipped(name, "the forward returned no tensors; outputs cannot be compared")
            return False
        identical = bit_identical(first, second)
        exact = identical if self.exact is None else self.exact
        if self.exact is not None:
            self.tolerance_reason = f"exact={self.exact} was asked for"
        else:
            self.tolerance_reason = "two identical forwards were " + (
                "bit-identical" if identical else "not bit-identical"
            )
        self.tolerance = attrs.evolve(self.tolerance, exact=exact)
        difference = self.tolerance.difference(first, second)
        if difference is None:
            how = "bit-identical" if identical else "equal within tolerance, not bit-identical"
            self.passed(name, f"two identical forwards gave {how} outputs")
            return True
        self.failed(
            name,
            f"two identical forwards disagree: {difference}",
            "make the forward deterministic (call model.eval() to turn dropout off; no "
            "random routing noise) or pass exact=False / --tolerant to compare with a tolerance",
        )
        return False

    def _check_load(self, load: Tensor, again: Tensor, tokens: list[int | None]) -> None:
        name, ok = "load-counts", True
        totals = int_list(load.sum(dim=1))
        from_inputs = tokens_in(self.batch)
        expected: dict[int, str] = {}
        for i in range(self.num_layers):
            # A layer run as layer.forward(...) fires no hook: then count from the inputs.
            total, seen = int(totals[i]), tokens[i] or from_inputs
            if total == 0 and tokens[i] == 0:
                ok = False
                self.failed(
                    name,
                    "recorded no load and was not called by the forward (its forward hooks "
                    "never fired)",
                    "moe_layers must list the modules that run (not copies or stale ones)",
                    layer=i,
                )
                continue
            if total == 0:
                ok = False
                self.failed(
                    name,
                    f"recorded no load for {seen if seen is not None else 'its'} tokens: it "
                    "never writes its row of expert_load_view",
                    "keep row moe_layer_idx of the expert_load_view handed to set_eplb_state (a "
                    "view, not a copy) and add one per (token, chosen expert) at the physical "
                    "slot that served it, on every forward",
                    layer=i,
                )
                continue
            top_k = top_k_of(self.view.moe_layers[i], self.view.model)
            if seen is not None and top_k is not None:
                want = seen * top_k
                expected[i] = f"{seen} tokens x top_k {top_k} = {want}"
                if total != want:
                    ok = False
                    self.failed(
                        name,
                        f"recorded {total} token-expert assignments for {expected[i]} "
                        f"({total / want:.2f}x)",
                        "add exactly one per (token, chosen expert): "
                        + (
                            "it counts every assignment twice (recorded in two places, or "
                            "added twice)"
                            if total == 2 * want
                            else "count the router's top-k choices, once each"
                        ),
                        layer=i,
                    )
            if not torch.equal(load[i], again[i]):
                ok = False
                self.failed(
                    name,
                    f"recorded {total} then {int(again[i].sum())} for the same input",
                    "record each forward's assignments into the pass view; do not keep a "
                    "running total of your own",
                    layer=i,
                )
        ok = self._check_layers_agree(name, totals, expected) and ok
        if ok:
            how = (
                next(iter(expected.values())) if len(set(expected.values())) == 1 else "as expected"
            )
            if len(expected) < self.num_layers:
                how = f"{int(totals[0])} assignments each (no top_k to check against)"
            self.passed(
                name,
                f"each of the {self.num_layers} MoE layers recorded {how}, the same in two "
                "identical forwards",
            )

    def _check_layers_agree(
        self, name: str, totals: list[int], expected: Mapping[int, str]
    ) -> bool:
        """Without a top_k to read, layers fed the same tokens must at least count the same."""
        unchecked = [i for i in range(self.num_layers) if i not in expected and totals[i] > 0]
        if len(unchecked) < 2:
            return True
        values = [totals[i] for i in unchecked]
        usual = max(set(values), key=values.count)
        ok = True
        for i in unchecked:
            if totals[i] != usual:
                ok = False
                self.failed(
                    name,
                    f"recorded {totals[i]} assignments where most layers recorded {usual} for "
                    "the same tokens (no top_k attribute found to check against)",
                    "add exactly one per (token, chosen expert); expose top_k (or "
                    "num_experts_per_tok) on the layer so this check can be exact",
                    layer=i,
                )
        return ok

    def _check_replicas(self) -> bool:
        name = "replicas"
        if self.num_physical == self.num_logical:
            self.skipped(name, "no redundant slots (physical == logical)")
            return True
        local = self.view.num_local_physical_experts
        first = self.state.ep.rank * local
        ok = True
        for i, layer in enumerate(self.view.moe_layers):
            tensors = list(layer.get_expert_weights())
            bad: list[int] = []
            for slot in range(max(self.num_logical, first), first + local):
                expert = int(self.initial[i, slot])
                if not first <= expert < first + local:
                    continue  # the original lives on another rank
                if not all(same_bits(t[slot - first], t[expert - first]) for t in tensors):
                    bad.append(slot)
            if bad:
                ok = False
                slot = bad[0]
                self.failed(
                    name,
                    f"{len(bad)} redundant slot(s) do not hold the bytes of the expert they "
                    f"replicate: slot {slot} should be a copy of logical expert "
                    f"{int(self.initial[i, slot])} (slot {int(self.initial[i, slot])})",
                    "initialise every redundant slot p >= E with a copy of expert p % E (the "
                    "initial placement); EPLB moves replicas as if they were that expert",
                    layer=i,
                )
        if ok:
            self.passed(
                name,
                f"every redundant slot holds the bytes of its expert "
                f"({self.num_physical - self.num_logical} per layer)",
            )
        return ok

    def _check_metadata(self, counter: TokenCounter) -> None:
        name, method = "metadata", "update_physical_experts_metadata"
        if protocol_default(self.view.model, method):
            self.skipped(name, f"{method} is not implemented (the protocol's default is used)")
            return
        before = (self.view.num_physical_experts, self.view.num_local_physical_experts)
        try:
            self.view.update_physical_experts_metadata(
                num_physical_experts=before[0], num_local_physical_experts=before[1]
            )
        except NotImplementedError:
            self.skipped(name, f"{method} raises NotImplementedError")
            return
        except Exception as exc:
            self.failed(
                name,
                f"{method}({before[0]}, {before[1]}) with the current counts raised "
                f"{type(exc).__name__}: {exc}",
                "accept the counts the model already has (a runner calls it after every "
                "change of EP size, including none)",
            )
            return
        after = (self.view.num_physical_experts, self.view.num_local_physical_experts)
        if after != before:
            self.failed(
                name,
                f"{method} with the current counts {before} changed them to {after}",
                "adopt exactly the counts passed in",
            )
            return
        self.check_outputs(
            name,
            counter,
            changed=f"outputs changed after {method} with unchanged counts",
            fix="with unchanged counts, keep slots, weights and the EPLB views as they are",
            unchanged=f"{method}{before} accepted; counts and outputs unchanged",
        )

    def _why_no_moves(self, comparable: bool, replicas_ok: bool) -> str | None:
        if not comparable:
            return "outputs cannot be compared (see 'repeatable')"
        if not replicas_ok:
            return "redundant slots are not replicas (see 'replicas'): moving them changes outputs"
        if self.num_physical < 2 or self.num_logical < 2:
            return "one expert or one slot: there is nothing to move"
        permuted = self._shuffled(self.initial)
        l2p, count = compute_logical_maps(
            permuted, self.num_logical, max_replicas(self.num_logical, self.num_physical)
        )
        device = self.live.logical_to_physical_map.device
        try:
            # Offer the model a moved placement; the state hands it its live views back below.
            self.view.set_eplb_state(
                expert_load_view=torch.zeros_like(self.live.expert_load_pass),
                logical_to_physical_map=l2p.to(device),
                logical_replica_count=count.to(device),
            )
        except Exception as exc:
            return f"the model accepts only its initial placement (it refused a moved one): {exc}"
        finally:
            self.state.reattach(_MODEL_NAME)
        return None

    def _shuffled(self, rows: Tensor) -> Tensor:
        """Each layer's row under a random permutation of its slots (never the unchanged row)."""
        generator = torch.Generator().manual_seed(self.seed)
        out = rows.clone()
        for layer in range(rows.shape[0]):
            row = rows[layer, torch.randperm(rows.shape[1], generator=generator)]
            out[layer] = row if not torch.equal(row, self.initial[layer]) else rows[layer].roll(1)
        return out

    def _moves(self) -> list[tuple[str, Tensor | None, str]]:
        """``(check name, placement, what the move does)``; no placement: why it cannot be made."""
        moves: list[tuple[str, Tensor | None, str]] = [
            ("move-permute", self._shuffled(self.initial), "a random permutation of the slots")
        ]
        if self.num_physical == self.num_logical:
            moves.append(
                ("move-replicas", None, "no redundant slots: replica counts cannot change")
            )
        else:
            rows = self.initial.clone()
            rows[:, self.num_logical :] = (
                self.num_logical - 1
            )  # the last expert takes every replica
            moves.append(
                (
                    "move-replicas",
                    self._shuffled(rows),
                    f"giving logical expert {self.num_logical - 1} every redundant slot",
                )
            )
        return moves

    def _check_move(self, name: str, placement: Tensor, what: str, counter: TokenCounter) -> bool:
        """Move to ``placement``, check outputs and maps; False when the move itself failed."""
        try:
            self.state.update_mapping(_MODEL_NAME, placement)
        except MoEProtocolsError as exc:
            self.failed(
                f"{name}:outputs",
                f"EplbState.update_mapping failed: {exc}",
                "make expert_weights views of the live weights, [local_physical, ...] each",
            )
            return False
        compared = self.compare_forward(f"{name}:outputs", counter)
        if compared is None:
            return False
        difference, load = compared
        if difference is None:
            moved = int((placement != self.initial).sum())
            self.passed(
                f"{name}:outputs",
                f"outputs unchanged after {what} ({moved} of {placement.numel()} slots moved)",
            )
        else:
            self.failed(
                f"{name}:outputs",
                f"outputs changed after {what}: {difference}",
                "route through the maps handed to set_eplb_state on every forward, and expose "
                "every expert tensor (views, not copies) in get_expert_weights(); the :maps "
                "check names a layer that does not follow the maps",
            )
        self._check_follows_maps(name, placement, load, changed=difference is not None)
        return True

    def _check_follows_maps(
        self, name: str, placement: Tensor, load: Tensor, changed: bool
    ) -> None:
        """Each layer's load, read through the new placement, must be the reference load.

        A layer fed other inputs (because an earlier one misrouted) differs too,
        so only a definite diagnosis, or the first layer that differs, fails; the
        layers after it are named in its message.
        """
        name = f"{name}:maps"
        want = logical_load(self.reference_load, self.initial, self.num_logical)
        seen = logical_load(load, placement, self.num_logical)
        stale = logical_load(load, self.initial, self.num_logical)
        slack = 0 if self.tolerance.exact else max(1, int(want.sum()) // (100 * self.num_layers))
        unchecked = [i for i in range(self.num_layers) if int(want[i].sum()) == 0]
        differing = [
            i
            for i in range(self.num_layers)
            if i not in unchecked and int((seen[i] - want[i]).abs().sum()) // 2 > slack
        ]
        found: list[tuple[int, str, str]] = []
        for i in differing:
            if changed and torch.equal(stale[i], want[i]):
                found.append((i, _STALE_MAPS, _KEEP_VIEWS))
            elif not changed and torch.equal(load[i, : self.num_logical], want[i]):
                found.append((i, _LOGICAL_IDS, "add each assignment at the slot that served it"))
        if differing and not found:
            found.append((differing[0], _LOAD_MOVED, _ROUTE_LIVE))
        named = {i for i, _, _ in found}
        for i, observed, fix in found:
            later = [j for j in differing if j > i and j not in named]
            if later and i == found[0][0]:
                observed += f"; MoE layers {later} differ too, possibly fed other inputs by it"
            self.failed(name, observed, fix, layer=i)
        if not found:
            note = f" (not checked, recording no load: {unchecked})" if unchecked else ""
            self.passed(name, f"every MoE layer routes and records by the new maps{note}")

    def _restore(self) -> None:
        """Move the model back to its initial placement (idempotent, called on every exit)."""
        if not self.state.model_names:
            return
        if torch.equal(self.live.physical_to_logical_map.cpu(), self.initial):
            return
        try:
            self.state.update_mapping(_MODEL_NAME, self.initial)
        except MoEProtocolsError as exc:
            self.failed(
                "restore",
                f"moving the experts back to the initial placement failed: {exc}; the model "
                "is left on another placement",
                "rebuild the model; fix what the error names",
            )

    def _check_restored(self, counter: TokenCounter) -> None:
        name = "restore"
        if not self.reference:
            self.skipped(name, "no reference outputs to compare with")
            return
        self.check_outputs(
            name,
            counter,
            changed="back on the initial placement, outputs differ from the first forward",
            fix="see the failures above",
            unchanged="back on the initial placement, outputs equal the first forward",
        )
