"""Files on disk and the hub: checkpoints, published crosscoders, a run's W&B log."""
