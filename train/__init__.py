"""Training half of the pipeline: data, MobileViT and baselines, balanced sampling, checkpoints."""
