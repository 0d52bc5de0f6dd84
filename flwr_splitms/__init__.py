"""flwr-splitms: SplitFed on Flower with Mask-Encoded Sparsification of cut-layer activations.

``from flwr_splitms import MSSplitStrategy`` is the entry point for a Flower ServerApp; the codecs
(``flwr_splitms.codecs``) and models (``flwr_splitms.models``) import without Flower.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["MSSplitStrategy", "SplitConfig", "__version__"]

if TYPE_CHECKING:
    from flwr_splitms.config import SplitConfig
    from flwr_splitms.strategy import MSSplitStrategy


def __getattr__(name: str) -> Any:
    """Import the Flower-facing classes on first use, keeping ``import flwr_splitms`` light."""
    if name == "MSSplitStrategy":
        from flwr_splitms.strategy import MSSplitStrategy

        return MSSplitStrategy
    if name == "SplitConfig":
        from flwr_splitms.config import SplitConfig

        return SplitConfig
    raise AttributeError(f"module 'flwr_splitms' has no attribute {name!r}")
