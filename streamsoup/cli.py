"""``streamsoup`` command line: a thin layer over the Python API.

Every failure becomes one line on stderr and an exit code: 2 bad usage or input
(nothing written), 1 failure while running (state kept), 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import fields

from . import __version__
from .api import merge
from .errors import StreamsoupError
from .options import MergeOptions


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
        shown = f"{default / 1e9:g}GB" if f.metadata.get("size") else default
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
    m.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    m.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "merge":
            overrides = {f.name: getattr(args, f.name) for f in fields(MergeOptions)}
            summary = merge(
                args.base,
                args.finetuned,
                args.out,
                config=args.config,
                fresh=args.fresh,
                progress=not args.quiet,
                **overrides,
            )
            if not args.quiet:
                print(summary.line())
        return 0
    except StreamsoupError as exc:
        sys.stderr.write(f"streamsoup: error: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("streamsoup: interrupted — rerun the same command to resume\n")
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
