"""vLLM plugin and launcher: VUA's connector by name, in every vLLM process, with upstream's names too.

vLLM loads every ``vllm.general_plugins`` entry point in each of its processes (the API
server, the engine core, the workers), so with VUA installed ``"kv_connector": "VUAConnector"``
works without ``kv_connector_module_path``. The original project's name,
``VUAStorageConnector_V1``, is registered as an alias, and its ``vua-vllm`` launcher is the
``vua-vllm`` console script: ``vua-vllm serve MODEL --kv-transfer-config ...``.
"""

from __future__ import annotations

NAMES = ("VUAConnector", "VUAStorageConnector_V1")  # ours, and the original project's


def register() -> None:
    """Registers the connector under its names with vLLM's factory (lazily: nothing heavy is imported)."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    for name in NAMES:
        if name not in KVConnectorFactory._registry:
            KVConnectorFactory.register_connector(name, "vua.vllm", "VUAConnector")


def main() -> None:
    """``vua-vllm``: vLLM's command line, with VUA's connector registered."""
    register()
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()
