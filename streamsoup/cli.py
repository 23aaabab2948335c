"""``streamsoup`` command line: a thin layer over the Python API.

Every failure becomes one line on stderr and an exit code: 2 bad usage or input
(nothing written), 1 failure while running (state kept), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import fields

from . import __version__
from .api import estimate, merge
from .audit import format_status, run_status, verify_output
from .errors import Interrupted, StreamsoupError
from .options import MergeOptions, format_size
from .signals import MESSAGE


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad usage as one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"streamsoup: error: {message} (see `{self.prog} --help`)\n")
        sys.exit(2)


def _add_option_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per MergeOptions field; defaults stay None so a --config file can supply them."""
    for f in fields(MergeOptions):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        shown = default if not f.metadata.get("size") else "auto" if default is None else f"{default / 1e9:g}GB"
        kwargs = dict(dest=f.name, default=None, help=f"{f.metadata['help']} (default: {shown})")
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        elif not f.metadata.get("size"):
            kwargs["type"] = type(default)
        parser.add_argument(flag, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="streamsoup", description="MonoSoup for huge sharded checkpoints, out of core.")
    parser.add_argument("--version", action="version", version=f"streamsoup {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    m = sub.add_parser(
        "merge",
        help="MonoSoup-edit FINETUNED against BASE into OUT",
        description="MonoSoup-edit FINETUNED against BASE into the new folder OUT.",
    )
    m.add_argument("base", metavar="BASE", help="pre-trained checkpoint: a folder of *.safetensors or one file")
    m.add_argument("finetuned", metavar="FINETUNED", help="fine-tuned checkpoint: a folder or one file")
    m.add_argument("out", metavar="OUT", help="output folder; appears only when complete")
    _add_option_flags(m)
    m.add_argument("--config", help="YAML file with the same keys as the flags (see configs/)")
    m.add_argument("--fresh", action="store_true", help="discard an earlier interrupted run of this OUT")
    m.add_argument("--work-dir", help="where the Zarr state lives (default: inside OUT.partial)")
    m.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    m.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    pl = sub.add_parser(
        "plan",
        help="what a merge would do, its memory and an estimated time; reads no tensor data",
        description="Plan a merge from the headers alone, with a short calibration of this machine.",
    )
    pl.add_argument("base", metavar="BASE")
    pl.add_argument("finetuned", metavar="FINETUNED")
    _add_option_flags(pl)
    pl.add_argument("--config", help="YAML file with the same keys as the flags")
    pl.add_argument("--json", action="store_true", help="machine-readable output")
    st = sub.add_parser("status", help="progress of a finished, running or interrupted merge")
    st.add_argument("out", metavar="OUT")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    ve = sub.add_parser("verify", help="re-check OUT's bytes against the checksums in its report")
    ve.add_argument("out", metavar="OUT")
    ve.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    for p in (pl, st, ve):
        p.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    return parser


def _merge(args: argparse.Namespace) -> int:
    overrides = {f.name: getattr(args, f.name) for f in fields(MergeOptions)}
    summary = merge(args.base, args.finetuned, args.out, config=args.config, fresh=args.fresh,
                    work_dir=args.work_dir, progress=not args.quiet, **overrides)  # fmt: skip
    if not args.quiet:
        print(summary.line())
    return 0


def _plan(args: argparse.Namespace) -> int:
    from .estimate import format_plan

    overrides = {f.name: getattr(args, f.name) for f in fields(MergeOptions)}
    summary = estimate(args.base, args.finetuned, config=args.config, **overrides)
    print(json.dumps(summary.as_dict(), indent=2) if args.json else format_plan(summary))
    return 0


def _status(args: argparse.Namespace) -> int:
    status = run_status(args.out)
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def _verify(args: argparse.Namespace) -> int:
    result = verify_output(args.out, progress=not args.quiet)
    for problem in result.problems:
        print(f"MISMATCH {problem}")
    if result.problems:
        sys.stderr.write(f"streamsoup: error: {len(result.problems)} problem(s) in {args.out}; rerun the merge\n")
        return 1
    print(f"verified {result.tensors} tensors ({format_size(result.bytes)}): all checksums match")
    return 0


COMMANDS = {"merge": _merge, "plan": _plan, "status": _status, "verify": _verify}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return COMMANDS[args.command](args)
    except Interrupted as exc:
        sys.stderr.write(f"streamsoup: {exc}\n")
        sys.stderr.flush()
        os._exit(exc.exit_code)  # in-flight tasks are abandoned: their tensors were never committed
    except StreamsoupError as exc:
        sys.stderr.write(f"streamsoup: error: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write(f"streamsoup: {MESSAGE}\n")
        return 130
    except MemoryError:
        sys.stderr.write("streamsoup: error: out of memory; lower --lanes or free memory, then rerun to resume\n")
        return 1
    except Exception as exc:  # a bug: still one line, with the way to see more
        if args.verbose:
            raise
        sys.stderr.write(f"streamsoup: internal error: {type(exc).__name__}: {exc} (rerun with -v for details)\n")
        return 1


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
