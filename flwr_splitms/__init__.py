"""flwr-splitms: SplitFed on Flower with Mask-Encoded Sparsification of cut-layer activations."""

__version__ = "0.1.0"
