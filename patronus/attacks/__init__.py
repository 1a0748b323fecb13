"""White-box attacks on a pipeline: fine-tuning, LoRA and component swaps."""
