"""ft-ray: distributed fine-tuning of language models on Ray."""

__version__ = "0.1.0"
