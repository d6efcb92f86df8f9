"""The hf-experts adapter: ``MixtureOfExperts`` over transformers models that do not implement it.

transformers 5.x stores the routed experts of an MoE layer in one *experts
module* holding fused 3-D parameters (``gate_up_proj`` or ``up_proj``, and
``down_proj``, dim 0 = expert), next to a router (``gate`` or ``router``).
This package finds those experts modules structurally -- a child called
``experts``, or a path named by the model's expert-parallel plan
(``_ep_plan`` / ``config.base_model_ep_plan``) -- and builds
:class:`HFMoEAdapter` over them. It never imports transformers and never asks
which class a module is: only attributes, parameter shapes and signatures.

**Expert weight layout.** ``HFMoELayer.get_expert_weights()`` returns views
(never copies) of the live parameters in ``nn.Linear`` orientation, always in
this order::

    gate       [experts, intermediate, hidden]   (absent for non-gated experts)
    up         [experts, intermediate, hidden]
    down       [experts, hidden, intermediate]
    gate_bias  [experts, intermediate]           (these three only when the
    up_bias    [experts, intermediate]            experts have biases; gate_bias
    down_bias  [experts, hidden]                  absent for non-gated experts)

so that expert ``e`` computes ``down[e] @ act(gate[e] @ x + gate_bias[e]) *
(up[e] @ x + up_bias[e]) + down_bias[e]``, where ``act`` is the experts
module's own gate function (see :meth:`HFMoELayer.expert_forward`). Stored
``[E, hidden, 2 * intermediate]`` (transposed) parameters are viewed through
``.transpose``; gate/up interleaved along the fused dimension (GPT-OSS) are
viewed with stride 2.

**Load recording.** Nothing is hooked until ``set_eplb_state``. Then each
layer records the router's real decision on every forward into its row of
``expert_load_view`` (``index_add_`` of ones, ids outside ``[0, E)`` ignored,
no host sync):

* experts modules called as ``experts(hidden, top_k_index, top_k_weights)``
  (every decorated family): a forward pre-hook on the experts module reads
  ``top_k_index [tokens, top_k]``, exactly what the experts compute with;
* experts modules called with one tensor (Llama-4, whose experts run densely
  on pre-scaled copies of every token): a forward hook on the router reads
  its dense ``scores [tokens, E]``; expert ``e`` counts a token when its score
  is non-zero (the router's sigmoid scores are exactly 0 off its top-k).

Hooks are removable (:meth:`HFMoEAdapter.remove_hooks`) and each layer notes
whether its hook fired; :meth:`HFMoEAdapter.check_recording` raises instead of
letting a replaced block (a hub kernel, ``use_kernels=True``) report zeros.

**Which object.** :data:`HF_EXPERTS_STEP` is an ``"adapt"`` step (the last
``MoEView`` step). It adapts an object only when its experts modules belong to
one language model (one layer stack, one expert count and top-k), and the walk
does not offer it an object that an ``"unwrap"`` step (``.model.language_model``,
``.language_model``, ``.thinker``, ``._orig_mod``, ``.module``, ...) goes past
to a model the step also adapts. So a VLM resolves through its wrapper to the
text model, and an omni model whose thinker and talker differ resolves to the
thinker. :data:`HF_GET_DECODER_STEP` is a ``"descend"`` step: a causal LM's
decoder is a part of it, so the adapter is still built over the causal LM.

transformers routes by logical expert id, so physical slots equal logical
experts: there are no redundant slots and nothing can be re-placed.
"""

from __future__ import annotations

from moe_protocols.adapters.hf._adapter import HFMoEAdapter
from moe_protocols.adapters.hf._discovery import HFDiscovery, discover_hf_moe
from moe_protocols.adapters.hf._layer import HFMoELayer
from moe_protocols.adapters.hf._recording import INDEX_HOOK, SCORES_HOOK
from moe_protocols.adapters.hf._steps import HF_EXPERTS_STEP, HF_GET_DECODER_STEP
from moe_protocols.adapters.hf._weights import HFExpertWeights

__all__ = [
    "HF_EXPERTS_STEP",
    "HF_GET_DECODER_STEP",
    "INDEX_HOOK",
    "SCORES_HOOK",
    "HFDiscovery",
    "HFExpertWeights",
    "HFMoEAdapter",
    "HFMoELayer",
    "discover_hf_moe",
]
