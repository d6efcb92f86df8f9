#!/usr/bin/env bash
# GPU smoke test of the vLLM plugin: serve a small MoE VLM with
# `vllm serve ... --enable-expert-parallel --enable-eplb` and the plugin, send
# a few requests, and check vLLM's log for the plugin's health line, EPLB
# registration and at least one rearrangement done by our policy.
#
# Needs: >= 2 NVIDIA GPUs (vLLM enables EPLB only with expert parallelism
# over more than one rank), a CUDA build of vLLM 0.33 and moe-protocols in
# the Python that runs this (`pip install 'moe-protocols[vllm]'`), and the
# model weights (downloaded by vLLM, or a local path in MODEL).
#
# Environment (all optional):
#   MODEL        served model (default moonshotai/Kimi-VL-A3B-Instruct: a
#                DeepSeek-V2 MoE behind a vision wrapper)
#   NUM_GPUS     data-parallel ranks, one GPU each (default 2)
#   PORT         HTTP port (default 8765)
#   MOE_PROTOCOLS_VLLM_POLICY  policy the plugin installs (default migration_aware)
#   PYTHON       interpreter with vLLM and moe-protocols (default python3)
#   LOG          where vLLM's log goes (default a temporary file, printed at the end)
# Exit status: 0 all checks passed; 2 this machine cannot run it (no GPU,
# too few GPUs, no vLLM); 1 a check failed.
set -euo pipefail

MODEL="${MODEL:-moonshotai/Kimi-VL-A3B-Instruct}"
NUM_GPUS="${NUM_GPUS:-2}"
PORT="${PORT:-8765}"
PYTHON="${PYTHON:-python3}"
export MOE_PROTOCOLS_VLLM_POLICY="${MOE_PROTOCOLS_VLLM_POLICY:-migration_aware}"
LOG="${LOG:-$(mktemp -t vllm-gpu-smoke.XXXXXX.log)}"

fail() { echo "vllm_gpu_smoke: FAIL: $*" >&2; exit 1; }
cannot() { echo "vllm_gpu_smoke: cannot run here: $*" >&2; exit 2; }

command -v nvidia-smi >/dev/null 2>&1 || cannot "nvidia-smi not found: this script needs NVIDIA GPUs"
gpus="$(nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU ' || true)"
[ "$gpus" -ge 1 ] || cannot "nvidia-smi lists no GPU"
[ "$gpus" -ge "$NUM_GPUS" ] || cannot "found $gpus GPU(s), need NUM_GPUS=$NUM_GPUS (EPLB needs expert parallelism over >= 2 ranks)"
"$PYTHON" - <<'PY' || cannot "vLLM 0.33 with CUDA and the moe-protocols plugin are not importable by $PYTHON"
import importlib.metadata as md, sys
import torch
assert torch.cuda.is_available(), "torch sees no CUDA device"
version = md.version("vllm")
assert version.startswith("0.33."), f"vLLM {version} is outside >=0.33,<0.34"
names = [e.name for e in md.entry_points(group="vllm.general_plugins")]
assert "moe_protocols" in names, f"the moe_protocols entry point is not installed: {names}"
print(f"vllm_gpu_smoke: vLLM {version}, torch {torch.__version__}, {torch.cuda.device_count()} CUDA device(s)")
PY

echo "vllm_gpu_smoke: serving $MODEL on $NUM_GPUS GPU(s), policy $MOE_PROTOCOLS_VLLM_POLICY; log: $LOG"
# Rebalance often (every 32 steps over a 16-step window) so a short run sees
# one; synchronously, so vLLM logs "Rearranged experts ... in N s" for it.
"$PYTHON" -m vllm.entrypoints.cli.main serve "$MODEL" \
    --port "$PORT" --trust-remote-code --max-model-len 4096 --max-num-seqs 16 \
    --data-parallel-size "$NUM_GPUS" --enable-expert-parallel --enable-eplb \
    --eplb-config '{"window_size": 16, "step_interval": 32, "use_async": false, "log_balancedness": true}' \
    >"$LOG" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' EXIT

for _ in $(seq 1 180); do
    if curl -fsS "http://127.0.0.1:$PORT/health" >/dev/null 2>&1; then break; fi
    kill -0 "$server" 2>/dev/null || { tail -n 60 "$LOG" >&2; fail "vllm serve exited during start-up"; }
    sleep 5
done
curl -fsS "http://127.0.0.1:$PORT/health" >/dev/null || { tail -n 60 "$LOG" >&2; fail "no /health after 15 minutes"; }

# Enough decode steps for two rearrangement periods, with and without an image.
"$PYTHON" - "$PORT" "$MODEL" <<'PY' || fail "requests failed"
import base64, io, json, sys, urllib.request
from PIL import Image
port, model = sys.argv[1], sys.argv[2]
buf = io.BytesIO(); Image.new("RGB", (224, 224), (200, 40, 40)).save(buf, format="PNG")
image = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
for i in range(8):
    content = [{"type": "text", "text": f"Describe this picture in detail ({i})."}]
    if i % 2 == 0:
        content.insert(0, {"type": "image_url", "image_url": {"url": image}})
    body = json.dumps({"model": model, "max_tokens": 96,
                       "messages": [{"role": "user", "content": content}]}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body,
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        text = json.load(r)["choices"][0]["message"]["content"]
    print(f"vllm_gpu_smoke: request {i}: {text[:60]!r}")
PY

echo "vllm_gpu_smoke: what vLLM logged:"
grep -E "moe-protocols|EPLB is enabled|Rearranged experts|EPLB step" "$LOG" | head -n 40 || true
grep -q "moe-protocols: vLLM plugin active" "$LOG" || fail "the plugin did not register (no 'vLLM plugin active' line)"
grep -q "EPLB policy: $MOE_PROTOCOLS_VLLM_POLICY" "$LOG" || fail "the plugin's policy is not $MOE_PROTOCOLS_VLLM_POLICY"
grep -q "moe-protocols: serving" "$LOG" || fail "no health line (the runner resolution did not run through the plugin)"
grep -q "EPLB is enabled for MoE part of model" "$LOG" || fail "vLLM did not register the MoE model with EPLB"
grep -q "Rearranged experts" "$LOG" || fail "no rearrangement in the run (raise the request count?)"
echo "vllm_gpu_smoke: PASS"
