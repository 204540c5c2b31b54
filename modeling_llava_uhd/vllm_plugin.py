"""vLLM plugin (entry point `vllm.general_plugins`): registers LLaVA-UHD's architecture with vLLM's model registry.

Importing this package registers `LlavaUhdConfig` with transformers' Auto classes, so vLLM reads a converted
folder's config without `trust_remote_code`.
"""

ARCHITECTURE = "LlavaUhdForConditionalGeneration"


def register() -> None:
    """Called by vLLM in every process it starts; the model module is imported only when vLLM builds the model."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, f"modeling_llava_uhd.vllm_llava_uhd:{ARCHITECTURE}")
