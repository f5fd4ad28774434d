"""The Wan2.1 DiT (`wan`): bidirectional teacher / critic and causal streaming generator, its KV cache with
the local window and EMA sink (`kv_cache`), the attention kernels (`attention`) and LoRA adapters (`lora`)."""
