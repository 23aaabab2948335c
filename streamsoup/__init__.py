"""streamsoup: MonoSoup (arXiv 2602.09689) for huge sharded checkpoints, out of core.

    streamsoup.plan(base, finetuned)          what a merge would do (headers only)   -> PlanSummary
    streamsoup.merge(base, finetuned, out)    the merge                              -> MergeSummary
    streamsoup.status(out)                    progress of a run                      -> RunStatus
    streamsoup.verify(out)                    checksums of a finished output         -> VerifyResult
    streamsoup.report(out, png=None)          what MonoSoup did, per module kind     -> RunReport
    streamsoup.demo(folder)                   a demo pair and the example configs    -> (base, finetuned)

``str()`` of each result is what the matching command prints.
"""

from ._version import __version__
from .api import demo, merge, plan, report, status, verify
from .options import MergeOptions
from .reporting import MergeSummary, RunReport
from .reporting.audit import RunStatus, VerifyResult
from .reporting.preview import PlanSummary

__all__ = [
    "merge",
    "plan",
    "status",
    "verify",
    "report",
    "demo",
    "MergeOptions",
    "MergeSummary",
    "PlanSummary",
    "RunStatus",
    "VerifyResult",
    "RunReport",
    "__version__",
]
