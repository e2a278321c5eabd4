"""Other frameworks that load bivlm checkpoints: transformers (``hf_quantizer``) and vLLM (``vllm_plugin``).
Each imports only the layers below it (``checkpoint``, ``ops``, ``nn``), never the other.
"""
