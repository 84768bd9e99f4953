"""From config to objects, the training loop, optimizer, checkpoints, validation."""
