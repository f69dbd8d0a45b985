"""Training recipes (Ray Train + DeepSpeed), their YAML configs and DeepSpeed configs."""
