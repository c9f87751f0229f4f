"""Text-to-image models: loading (built-in random models, hub ids, folders, single files),
families and their text encoders, the built-in random pipelines, and LoRA files fused at load."""
