"""Non-fine-tunable learning, for any component: training against simulated fine-tuning attacks.

`space` says what the simulated attacker may do and draws one attack per outer step; `lora`
is the low-rank update it may train instead of full weights; `maml` plays the attack on a
functional copy of the parameters and turns the query loss along its trajectory into a
gradient for the defended weights (first- or second-order), merged with the other terms in
one place. The attacker's loss and the query loss are arguments: the decoder moderator
passes reconstruction and refusal, a UNet stage would pass denoising and its own refusal.
"""
