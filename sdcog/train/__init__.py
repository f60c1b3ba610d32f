"""Fine-tuning with `cog train`: what the trainer reads from its inputs and how it prepares them
(dataset)."""
