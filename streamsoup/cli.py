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
import warnings
from dataclasses import Field, fields

from ._version import __version__
from .api import demo, merge, plan, report, status, verify
from .errors import Interrupted, OptionError, StreamsoupError
from .options import MergeOptions, flag_name
from .run.signals import MESSAGE, terminate_as_interrupt
from .synthetic import PRESETS, preset_bytes
from .units import format_size, utc_stamp


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad usage as one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"streamsoup: error: {message} (see `{self.prog} --help`)\n")
        sys.exit(2)


def _default_text(f: Field) -> str:
    """The default as help shows it: one "(default: ...)", none when there is nothing to show."""
    shown = f.metadata.get("shown")
    if shown is None:
        if isinstance(f.default, bool):
            return ""
        shown = f"{f.default / 1e9:g}GB" if f.metadata.get("size") and f.default else f.default
    return f" (default: {shown})" if shown not in ("", None) else ""


def _add_option_flags(parser: argparse.ArgumentParser, options: list[Field]) -> None:
    """One flag per MergeOptions field; defaults stay None so a --config file can supply them."""
    for f in options:
        kwargs: dict = dict(dest=f.name, default=None, help=f"{f.metadata['help']}{_default_text(f)}")
        if isinstance(f.default, bool):
            kwargs["action"] = "store_true"
        elif f.metadata.get("patterns"):
            kwargs.update(action="append", metavar="REGEX")
        elif f.metadata.get("const"):
            kwargs.update(nargs="?", const=f.metadata["const"], metavar="ADDR")
        elif f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        elif not (f.metadata.get("size") or f.metadata.get("path")):
            kwargs["type"] = type(f.default)
        parser.add_argument(flag_name(f.name), **kwargs)


BASE_HELP = (
    "pre-trained checkpoint: a folder of *.safetensors or torch.save *.bin/*.pt/*.pth shards (with or "
    "without an index), one such file, or a Hugging Face repo id"
)
FINETUNED_HELP = "the fine-tune of BASE: the same kinds of folder, file or repo id, or a PEFT LoRA adapter folder"
OUT_HELP = "the merge's output folder (a finished one, or one whose OUT.partial an interrupted run left)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="streamsoup", description="MonoSoup for huge sharded checkpoints, out of core.")
    parser.add_argument("--version", action="version", version=f"streamsoup {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    m = sub.add_parser(
        "merge",
        help="MonoSoup-edit FINETUNED against BASE into OUT",
        description="MonoSoup-edit FINETUNED against BASE into the new folder OUT. Rerun the same command after "
        "any interruption to resume; once OUT is complete, rerunning it does nothing and exits 0.",
    )
    m.add_argument("base", metavar="BASE", help=BASE_HELP)
    m.add_argument("finetuned", metavar="FINETUNED", help=FINETUNED_HELP)
    m.add_argument("out", metavar="OUT", help="output folder (new); appears only when complete")
    _add_option_flags(m, list(fields(MergeOptions)))
    m.add_argument(
        "--config",
        help="YAML file with the same keys as the flags (examples: `streamsoup demo DIR` writes them to DIR/configs)",
    )
    m.add_argument("--fresh", action="store_true", help="discard an earlier interrupted run of this OUT")
    m.add_argument("-q", "--quiet", action="store_true", help="no progress or summary (warnings and errors stay)")
    m.add_argument("-v", "--verbose", action="store_true", help="log what happens, dask's messages included")
    pl = sub.add_parser(
        "plan",
        help="what a merge would do, its memory and an estimated time; reads no tensor data",
        description="Plan a merge from the headers alone, with a short calibration of this machine.",
    )
    pl.add_argument("base", metavar="BASE", help=BASE_HELP)
    pl.add_argument("finetuned", metavar="FINETUNED", help=FINETUNED_HELP)
    _add_option_flags(pl, MergeOptions.plan_fields())
    for f in fields(MergeOptions):  # accepted only to be refused by name (see options.py: MergeOptions.for_plan)
        if not f.metadata["plan"]:
            bool_flag = isinstance(f.default, bool)
            pl.add_argument(
                flag_name(f.name),
                dest=f.name,
                default=None,
                help=argparse.SUPPRESS,
                **({"action": "store_true"} if bool_flag else {}),
            )
    pl.add_argument("--config", help="YAML file with the same keys as the flags")
    pl.add_argument("--json", action="store_true", help="machine-readable output")
    st = sub.add_parser("status", help="progress of a finished, running or interrupted merge")
    st.add_argument("out", metavar="OUT", help=OUT_HELP)
    st.add_argument("--json", action="store_true", help="machine-readable output")
    ve = sub.add_parser("verify", help="re-check OUT's bytes against the checksums in its report")
    ve.add_argument("out", metavar="OUT", help="a finished merge's output folder")
    ve.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    re_ = sub.add_parser(
        "report",
        help="what MonoSoup did, per module kind and layer; --png draws it",
        description="Summarise a merge: per module kind the median and range of k/rank, P_k and the lambdas, "
        "the tensors that stand out, totals. Works on a finished OUT and on an unfinished run (OUT, OUT.partial "
        "or its --work-dir).",
    )
    re_.add_argument("out", metavar="OUT", help=OUT_HELP + ", or the --work-dir of that run")
    re_.add_argument("--json", action="store_true", help="machine-readable output (the report's structure)")
    re_.add_argument(
        "--png",
        metavar="FILE",
        help="also draw one figure into FILE (needs matplotlib: "
        "pip install 'streamsoup[report]'); never replaces an existing file without --force",
    )
    re_.add_argument("--force", action="store_true", help="let --png replace an existing FILE")
    de = sub.add_parser(
        "demo",
        help="write a small demo pair and the example configs into DIR",
        description="Write a small Llama-shaped pair (DIR/base, DIR/finetuned: bf16 shards with an "
        "index, config and tokenizer files, plus the awkward tensors real pairs have) and the example "
        "configs (DIR/configs/*.yaml), then say how to merge them.",
    )
    de.add_argument("dir", metavar="DIR", help="folder to write base/, finetuned/ and configs/ into")
    sizes = ", ".join(f"{name} {format_size(preset_bytes(name), 1)}" for name in PRESETS)
    de.add_argument(
        "--preset",
        default="small",
        choices=sorted(PRESETS),
        help=f"model shape, with the size of each checkpoint: {sizes} (default: small)",
    )
    for p in (pl, st, ve, re_, de):
        p.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    return parser


def _merge(args: argparse.Namespace) -> int:
    overrides = {f.name: getattr(args, f.name) for f in fields(MergeOptions)}
    summary = merge(
        args.base, args.finetuned, args.out, config=args.config, fresh=args.fresh, progress=not args.quiet, **overrides
    )
    if not args.quiet:
        print(summary.line())
    return 0


def _show(result, as_json: bool) -> None:
    """A result as the CLI prints it: its text, or with --json its dict."""
    print(json.dumps(result.as_dict(), indent=2) if as_json else str(result))


def _plan(args: argparse.Namespace) -> int:
    overrides = {f.name: getattr(args, f.name) for f in fields(MergeOptions)}
    _show(plan(args.base, args.finetuned, config=args.config, **overrides), args.json)
    return 0


def _status(args: argparse.Namespace) -> int:
    _show(status(args.out), args.json)
    return 0


def _verify(args: argparse.Namespace) -> int:
    result = verify(args.out, progress=not args.quiet)
    print(result)
    if not result.ok:
        sys.stderr.write(
            f"streamsoup: error: {len(result.problems)} problem(s) in {args.out}; its bytes are not "
            f"what the merge wrote: to write it again: {result.repair}\n"
        )
        return 1
    return 0


def _report(args: argparse.Namespace) -> int:
    # report() checks for matplotlib and the figure's file before reading anything
    _show(report(args.out, png=args.png, force=args.force), args.json)
    if args.png:
        sys.stdout.flush()
        sys.stderr.write(f"streamsoup: figure written to {args.png}\n")
    return 0


def _demo(args: argparse.Namespace) -> int:
    base, ft = demo(args.dir, preset=args.preset)
    size = sum(f.stat().st_size for f in ft.glob("*.safetensors"))
    print(
        f"wrote {base}, {ft} ({size / 2**20:.1f} MiB each) and {base.parent / 'configs'} (example configs)\n"
        f"next: streamsoup merge {base} {ft} {base.parent / 'merged'}"
    )
    return 0


COMMANDS = {"merge": _merge, "plan": _plan, "status": _status, "verify": _verify, "report": _report, "demo": _demo}


class _LineFormatter(logging.Formatter):
    """`streamsoup: warning: ...`, like our errors; -v adds the logger's name; a batch log (no terminal)
    the UTC time, like its progress lines."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose
        self.stamped = not sys.stderr.isatty()

    def format(self, record: logging.LogRecord) -> str:
        where = f" {record.name}" if self.verbose else ""
        stamp = f"{utc_stamp()} " if self.stamped else ""
        return f"{stamp}streamsoup: {record.levelname.lower()}{where}: {record.getMessage()}"


def setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(_LineFormatter(verbose))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler], force=True)
    if not verbose:  # dask/tornado warnings (a busy dashboard port, ...) are noise in a normal run
        for module in ("distributed", "dask", "tornado", "bokeh"):
            warnings.filterwarnings("ignore", module=module)
        # a local cluster torn down after a failure can leave an unretrieved comm timeout behind, which
        # asyncio logs as an error after ours ("Future exception was never retrieved"): noise, not a second error
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    logging.captureWarnings(True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        with terminate_as_interrupt():
            return COMMANDS[args.command](args)
    except Interrupted as exc:
        sys.stderr.write(f"streamsoup: {exc}\n")
        sys.stderr.flush()
        os._exit(exc.exit_code)  # in-flight tasks are abandoned: their tensors were never committed
    except OptionError as exc:  # named as the flag here; the API names the keyword
        sys.stderr.write(f"streamsoup: error: {exc.for_cli()}\n")
        return exc.exit_code
    except StreamsoupError as exc:
        sys.stderr.write(f"streamsoup: error: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write(f"streamsoup: {MESSAGE}\n")
        return 130
    except BrokenPipeError:  # `streamsoup report OUT | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
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
