"""Attacks that change the model's weights: fine-tuning and LoRA of the UNet, decoder and text encoder."""
