"""`bsmamba2 models`: the model names `--model` knows, what each is, its scores and size, and whether it is cached."""

from __future__ import annotations

import argparse

from bsmamba2 import pretrained

HELP = "list the known model names: what each is, its scores, its size, and whether and where it is cached"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--paths", action="store_true", help="print only the cached files' paths, one a line")


def run(args: argparse.Namespace) -> int:
    entries = pretrained.known_models()
    if args.paths:
        for e in entries:
            if e.cached:
                print(e.path)
        return 0
    print(f"cache: {pretrained.cache_dir()}  (set BSMAMBA2_CACHE to move it; BSMAMBA2_OFFLINE=1 never downloads)")
    for e in entries:
        default = "  [default]" if e.name == pretrained.DEFAULT_MODEL else ""
        where = f"cached: {e.path}" if e.cached else f"not cached (downloaded on first use to {e.path})"
        print(f"\n{e.name}{default}\n  {e.what}\n  scores: {e.scores}\n  size:   {e.size}\n  {where}")
    print("\nalso: --model PATH (a .ckpt or .safetensors file), --model URL, --model hf://OWNER/REPO[/FILE]")
    return 0
