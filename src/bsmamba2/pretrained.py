"""Pretrained models: the small demo model bundled in the package, and downloads of published checkpoints.

The bundled model was trained on synthetic songs only (see its model card, `model_card()`); it shows the pipeline
working end to end but is no substitute for a MUSDB18-HQ-trained checkpoint on real music. The paper's own
checkpoints are published by the authors (links in the README of github.com/EuiYeonKim/BSMamba2); `download`
fetches them, or any other URL, into a local cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_MODEL = ASSETS / "demo-bsmamba2-synthetic.safetensors"
DEMO_CARD = ASSETS / "demo-bsmamba2-synthetic.md"


@dataclass(frozen=True)
class Published:
    """A checkpoint published by the paper's authors."""

    url: str
    filename: str
    sha256: str | None  # None: not published; the hash is logged after download so it can be pinned
    note: str


def _drive(file_id: str) -> str:
    return f"https://drive.usercontent.google.com/download?id={file_id}&export=download&confirm=t"


PUBLISHED: dict[str, Published] = {
    "bsmamba2-musdb": Published(_drive("1W-IX8I5B2g-8JA5Zaf-HkUul0MpOEBaZ"), "bsmamba2-musdb.ckpt", None,
                                "BSMamba2, MUSDB18-HQ vocals (paper: cSDR 11.03 dB, uSDR 10.70 dB)"),
    "bsroformer-musdb": Published(_drive("1xAjVjCIp71gqjjgCJYjU1yaMLp39pHEm"), "bsroformer-musdb.ckpt", None,
                                  "BS-RoFormer baseline, MUSDB18-HQ vocals (paper: cSDR 10.47 dB, uSDR 10.29 dB)"),
}


def default_checkpoint() -> Path | None:
    """The bundled demo model, or None when the package was installed without it."""
    return DEMO_MODEL if DEMO_MODEL.is_file() else None


def model_card() -> str:
    return DEMO_CARD.read_text() if DEMO_CARD.is_file() else "no bundled model card"


def cache_dir() -> Path:
    """Where downloads go: $BSMAMBA2_CACHE, else $XDG_CACHE_HOME/bsmamba2, else ~/.cache/bsmamba2."""
    if os.environ.get("BSMAMBA2_CACHE"):
        return Path(os.environ["BSMAMBA2_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bsmamba2"


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def download(name_or_url: str, dest: str | os.PathLike | None = None, sha256: str | None = None,
             progress: bool = True, timeout: float = 60.0) -> Path:
    """Fetch a published checkpoint (by name, see `PUBLISHED`) or any URL (http, https, file) to `dest`.

    Written to a temporary file and renamed, so an interrupted download leaves nothing behind; an existing file
    with the right hash (when one is known) is reused. Raises ValueError on a hash mismatch.
    """
    if name_or_url in PUBLISHED:
        entry = PUBLISHED[name_or_url]
        url, filename, sha256 = entry.url, entry.filename, sha256 or entry.sha256
    elif "://" in name_or_url:
        url, filename = name_or_url, Path(urllib.request.url2pathname(name_or_url.split("?")[0])).name or "model.ckpt"
    else:
        raise ValueError(f"unknown model {name_or_url!r}; known: {', '.join(PUBLISHED)} (or give a URL)")
    dest = Path(dest) if dest is not None else cache_dir() / filename
    if dest.is_file() and (sha256 is None or sha256_file(dest) == sha256):
        log.info("using %s (already downloaded)", dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, os.fdopen(fd, "wb") as out:
            kind = response.headers.get("Content-Type", "") if hasattr(response, "headers") else ""
            if "text/html" in kind:
                raise ValueError(f"{url} returned a web page, not a checkpoint (a sign-in or quota page?); "
                                 "download it in a browser and pass the file with --checkpoint")
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress) as bar:
                while block := response.read(1 << 20):
                    out.write(block)
                    bar.update(len(block))
        digest = sha256_file(tmp)
        if sha256 is not None and digest != sha256:
            raise ValueError(f"{url}: downloaded file has SHA-256 {digest}, expected {sha256}; not saved")
        os.replace(tmp, dest)
        log.info("saved %s (sha256 %s)", dest, digest)
    except OSError as err:
        raise RuntimeError(f"could not download {url}: {err}; check the network, or download it yourself and "
                           "pass the file with --checkpoint") from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest

