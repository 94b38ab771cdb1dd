"""`bsmamba2 download`: fetch a published checkpoint (or any URL) into the local cache."""

from __future__ import annotations

import argparse
import logging

from bsmamba2 import pretrained

HELP = "download a published checkpoint (the paper's BSMamba2 / BS-RoFormer) or any URL"
log = logging.getLogger("bsmamba2")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=f"one of {', '.join(pretrained.PUBLISHED)}, or a URL")
    p.add_argument("-o", "--output", help="file to write (default: the cache, $BSMAMBA2_CACHE or ~/.cache/bsmamba2)")
    p.add_argument("--sha256", help="expected SHA-256 of the file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    path = pretrained.download(args.model, args.output, sha256=args.sha256, progress=not args.quiet)
    log.info("%s\nuse it with: bsmamba2 separate SONG --checkpoint %s", path, path)
    return 0
