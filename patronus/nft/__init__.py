"""Non-fine-tunable learning: training against simulated fine-tuning attacks (first-order MAML)."""
