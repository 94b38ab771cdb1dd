"""`bsmamba2` command line: argument parsing, logging set-up, and the one place where errors become exit codes.

Each sub-command lives in `bsmamba2.commands.<name>` and provides:
    HELP: str                                   one-line description
    add_arguments(parser: argparse.ArgumentParser) -> None
    run(args: argparse.Namespace) -> int        exit code (0 = success)
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from bsmamba2 import MissingExtra

COMMANDS = ("separate", "evaluate", "train", "export", "synth", "demo", "download", "models")

EXIT_USAGE = 2
EXIT_FAILURE = 1


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line, or with `only` just that sub-command (what `main` builds when argv names one: each
    command module imports what it needs, and a torchrun job starts one process per GPU, so the others stay out)."""
    parser = argparse.ArgumentParser(prog="bsmamba2", description="BSMamba2 vocal separation")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS if only is None else (only,):
        module = _load(name)
        if module is None:
            continue
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def _load(name: str):
    try:
        return importlib.import_module(f"bsmamba2.commands.{name}")
    except ModuleNotFoundError as err:
        if err.name == f"bsmamba2.commands.{name}":
            return None  # command not built yet
        raise


def _named_command(argv: list[str]) -> str | None:
    """The sub-command argv names (its first word that is not an option), if it is one of ours."""
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if first in COMMANDS else None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(_named_command(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(message)s" if not args.verbose else "%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "_module", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args._module.run(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        logging.getLogger("bsmamba2").error("error: %s", err)
        return EXIT_FAILURE
    except MissingExtra as err:  # an optional extra that is not installed: its message says what to install
        logging.getLogger("bsmamba2").error("error: %s", err)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        logging.getLogger("bsmamba2").error("interrupted")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
