"""The downstream benchmark: task registry, per-task pipelines and networks, fine-tuning, results."""
