"""Training, evaluation and fine-tuning entry points for Barlow Twins (Accelerate-driven)."""
