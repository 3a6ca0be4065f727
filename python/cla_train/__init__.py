"""Training companion of the cla engine: small Cross-Layer Attention models in PyTorch,
exported in the engine's model-directory format (see README.md)."""

__version__ = "0.1.0"
