"""streamsoup: MonoSoup (arXiv 2602.09689) for huge sharded checkpoints, out of core.

    streamsoup.plan(base, finetuned)          what a merge would do (headers only)   -> PlanSummary
    streamsoup.merge(base, finetuned, out)    the merge                              -> MergeSummary
    streamsoup.status(out)                    progress of a run                      -> RunStatus
    streamsoup.verify(out)                    checksums of a finished output         -> VerifyResult
    streamsoup.report(out, png=None)          what MonoSoup did, per module kind     -> RunReport

``str()`` of each result is what the matching command prints.
"""

__version__ = "0.4.0"

from .api import merge, plan, report, status, verify  # noqa: E402
from .audit import RunStatus, VerifyResult  # noqa: E402
from .estimate import PlanSummary  # noqa: E402
from .options import MergeOptions  # noqa: E402
from .reporting import MergeSummary, RunReport  # noqa: E402

__all__ = ["merge", "plan", "status", "verify", "report", "MergeOptions", "MergeSummary", "PlanSummary",
           "RunStatus", "VerifyResult", "RunReport", "__version__"]
