"""routesae: a plugin-based zoo of sparse autoencoders for language models, on TransformerLens."""

__version__ = "0.1.0"
