"""Prompt to frames: the pipeline that holds generator, text encoder and codec (`pipeline`), and the
interactive session that makes blocks on demand at flat memory and switches prompts mid-stream (`session`)."""
