"""TrainerService: the trainable model, losses, optimizer, checkpoints, weight push."""
