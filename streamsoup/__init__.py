"""streamsoup: MonoSoup (arXiv 2602.09689) for huge sharded checkpoints, out of core."""

__version__ = "0.2.0"

from .api import merge  # noqa: E402
from .options import MergeOptions  # noqa: E402
from .report import MergeSummary  # noqa: E402

__all__ = ["merge", "MergeOptions", "MergeSummary", "__version__"]
