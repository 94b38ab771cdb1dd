"""`bsmamba2 download`: fetch a model into the local cache now, for machines that go offline later."""

from __future__ import annotations

import argparse
import logging

from bsmamba2 import pretrained

HELP = "download a model (the paper's bsmamba2-musdb, bsroformer-musdb, a URL or hf://OWNER/REPO) into the cache"
log = logging.getLogger("bsmamba2")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=f"one of {', '.join(pretrained.PUBLISHED)}, a URL, or hf://OWNER/REPO[/FILE]")
    p.add_argument("-o", "--output", help="file to write (default: the cache, $BSMAMBA2_CACHE or ~/.cache/bsmamba2)")
    p.add_argument("--sha256", help="expected SHA-256 of the file")
    p.add_argument("--force", action="store_true", help="download again even if an intact copy is cached")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if args.model.startswith("hf://"):
        if args.output or args.sha256:
            raise ValueError("--output and --sha256 apply to names and URLs; hf:// files go to the Hub cache")
        path = pretrained.resolve(args.model, progress=not args.quiet)
    else:
        path = pretrained.download(args.model, args.output, sha256=args.sha256, progress=not args.quiet,
                                   force=args.force)
    use = args.model if args.model in pretrained.PUBLISHED and not args.output else str(path)
    log.info("%s\nuse it with: bsmamba2 separate SONG --model %s", path, use)
    return 0
