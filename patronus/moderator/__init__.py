"""The internal moderator: a VAE decoder that decodes unsafe latents to black."""
