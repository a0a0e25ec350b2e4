"""Publishing Barlow Twins encoders to the Hugging Face Hub (export, model cards, conversion)."""
