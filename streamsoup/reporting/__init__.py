"""What a merge did: the report file it writes, the terminal summary, the JSON and the figure of `streamsoup report`.

record.py   streamsoup_report.json and streamsoup_spectra.npz, written by a merge
kinds.py    module kind and layer of a tensor, from its name
summary.py  per-kind statistics, tensors that stand out, totals; the terminal text
read.py     a finished output or the state of an unfinished run, as a RunReport
figure.py   the PNG (matplotlib, an optional extra)
"""

from .read import RunReport, read_run
from .record import (
    REPORT_NAME,
    SPECTRA_NAME,
    MergeSummary,
    describe_inputs,
    read_report,
    run_head,
    write_report,
    write_spectra,
)

__all__ = [
    "REPORT_NAME",
    "SPECTRA_NAME",
    "MergeSummary",
    "RunReport",
    "describe_inputs",
    "read_report",
    "read_run",
    "run_head",
    "write_report",
    "write_spectra",
]
