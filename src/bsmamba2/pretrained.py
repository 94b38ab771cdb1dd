"""Models by name: the paper's published weights fetched on first use, the bundled demo model, URLs and the Hub.

`resolve(spec)` turns what a user writes after `--model` into a local checkpoint file:

    bsmamba2-musdb          the authors' BSMamba2 weights (the default), downloaded once into the cache
    bsroformer-musdb        the authors' BS-RoFormer baseline
    demo                    the small model bundled in the package (synthetic songs only; see `model_card()`)
    PATH                    a checkpoint file (official Lightning .ckpt or bsmamba2 .safetensors)
    https://… / file://…    any URL, downloaded once into the cache
    hf://OWNER/REPO[/FILE]  a file of a Hugging Face Hub model repo (needs the `hub` extra: huggingface_hub)

Downloads go to `cache_dir()` ($BSMAMBA2_CACHE, else $XDG_CACHE_HOME/bsmamba2, else ~/.cache/bsmamba2). They are
written to `<file>.part` and renamed only when complete and verified; an interrupted download resumes from the
`.part` file with an HTTP Range request on the next try. The SHA-256 of each download is recorded next to it
(`<file>.json`) and checked on every later load, so a damaged cache file is detected and fetched again. Google
Drive's large-file confirmation page is followed; its quota and sign-in pages become an error with the manual link.
Proxies come from the environment (http_proxy, https_proxy, no_proxy), as urllib reads them. Offline mode
(`offline=True` or BSMAMBA2_OFFLINE=1) never touches the network and says what is missing. BSMAMBA2_MIRROR=URL
fetches the published files from URL/<filename> instead of Google Drive (a mirror, or a test server).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import http.client
import json
import logging
import os
import re
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from html.parser import HTMLParser
from http.cookiejar import CookieJar
from pathlib import Path

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_MODEL = ASSETS / "demo-bsmamba2-synthetic.safetensors"
DEMO_CARD = ASSETS / "demo-bsmamba2-synthetic.md"

DEFAULT_MODEL = "bsmamba2-musdb"
DEMO = "demo"
OFFLINE_ENV = "BSMAMBA2_OFFLINE"
MIRROR_ENV = "BSMAMBA2_MIRROR"
CHUNK = 1 << 20


@dataclass(frozen=True)
class Published:
    """A checkpoint published by the paper's authors (the 'Pretrained Weights' table of the official README)."""

    name: str
    drive_id: str
    filename: str
    what: str
    csdr: float  # vocals, MUSDB18-HQ test, as reported in the paper / official README
    usdr: float
    params: int
    sha256: str | None = None  # None: not published; the first download's hash is recorded and checked after that

    @property
    def url(self) -> str:
        return f"https://drive.usercontent.google.com/download?id={self.drive_id}&export=download&confirm=t"

    @property
    def page(self) -> str:
        """The link a person opens in a browser."""
        return f"https://drive.google.com/file/d/{self.drive_id}/view"

    @property
    def size_note(self) -> str:
        return f"{self.params / 1e6:.1f}M parameters, ~{self.params * 4 / 1e6:.0f} MB of float32 weights"


PUBLISHED: dict[str, Published] = {
    p.name: p for p in (
        Published("bsmamba2-musdb", "1W-IX8I5B2g-8JA5Zaf-HkUul0MpOEBaZ", "bsmamba2-musdb.ckpt",
                  "BSMamba2, vocals, trained on MUSDB18-HQ (the paper's model)", 11.03, 10.70, 48_098_188),
        Published("bsroformer-musdb", "1xAjVjCIp71gqjjgCJYjU1yaMLp39pHEm", "bsroformer-musdb.ckpt",
                  "BS-RoFormer baseline, vocals, trained on MUSDB18-HQ", 10.47, 10.29, 0),
    )
}  # fmt: skip


class DownloadError(ValueError, RuntimeError):
    """A download or cache problem the user can act on (a web page instead of a file, a hash mismatch, a dropped
    connection, offline mode); the message says how."""


def default_checkpoint() -> Path | None:
    """The bundled demo model, or None when the package was installed without it."""
    return DEMO_MODEL if DEMO_MODEL.is_file() else None


def model_card() -> str:
    return DEMO_CARD.read_text() if DEMO_CARD.is_file() else "no bundled model card"


def cache_dir() -> Path:
    """Where downloads go: $BSMAMBA2_CACHE, else $XDG_CACHE_HOME/bsmamba2, else ~/.cache/bsmamba2."""
    if os.environ.get("BSMAMBA2_CACHE"):
        return Path(os.environ["BSMAMBA2_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "bsmamba2"


def is_offline(offline: bool | None = None) -> bool:
    """`offline` when given, else whether $BSMAMBA2_OFFLINE is set to 1/true/yes."""
    if offline is not None:
        return bool(offline)
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def sha256_file(path: str | os.PathLike, block: int = CHUNK) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _record(path: Path, source: str, digest: str) -> None:
    _write_json(_sidecar(path), {
        "sha256": digest, "size": path.stat().st_size, "source": source,
        "recorded": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    })  # fmt: skip


def verify_cached(path: Path, expected: str | None = None) -> bool:
    """Whether the cached `path` is intact: its SHA-256 equals the one recorded at download (and `expected` if given).

    A file without a record (placed by hand, or by an older version) is trusted once and its hash recorded.
    """
    if not path.is_file():
        return False
    record: dict = {}
    if _sidecar(path).is_file():
        try:
            record = json.loads(_sidecar(path).read_text())
        except (OSError, ValueError):
            record = {}
    want = expected or record.get("sha256")
    if record.get("size") is not None and record["size"] != path.stat().st_size:
        log.warning("%s: %d bytes, but %d were downloaded; the cached file is damaged", path, path.stat().st_size,
                    record["size"])
        return False
    digest = sha256_file(path)
    if want is None:
        log.info("%s: no recorded SHA-256; recording %s", path, digest)
        _record(path, record.get("source", "placed in the cache"), digest)
        return True
    if digest != want:
        log.warning("%s: SHA-256 %s, expected %s; the cached file is damaged", path, digest, want)
        return False
    return True


# -- downloading -----------------------------------------------------------------------------------------------------
class _PageParser(HTMLParser):
    """The forms (action, hidden inputs) and links of an HTML page, and its visible text."""

    def __init__(self):
        super().__init__()
        self.forms: list[tuple[str, dict[str, str]]] = []
        self.links: list[str] = []
        self.text: list[str] = []
        self._form: tuple[str, dict[str, str]] | None = None

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self._form = (a.get("action", ""), {})
            self.forms.append(self._form)
        elif tag == "input" and self._form is not None and a.get("name"):
            self._form[1][a["name"]] = a.get("value", "")
        elif tag == "a" and a.get("href"):
            self.links.append(a["href"])

    def handle_endtag(self, tag):
        if tag == "form":
            self._form = None

    def handle_data(self, data):
        if data.strip():
            self.text.append(data.strip())


def _confirmation_url(page: str, base: str) -> str | None:
    """The real download URL behind Google Drive's "can't scan this file for viruses" page, if `page` is one:
    its download form (action + hidden inputs, the confirm token among them) or a link carrying confirm=."""
    parser = _PageParser()
    parser.feed(page)
    for action, fields in parser.forms:
        if "confirm" in fields or "download" in action:
            url = urllib.parse.urljoin(base, action or base)
            return url + ("&" if "?" in url else "?") + urllib.parse.urlencode(fields)
    for href in parser.links:
        if "confirm=" in href and "download" in href:
            return urllib.parse.urljoin(base, href.replace("&amp;", "&"))
    return None


def _page_error(url: str, page: str, manual: str | None, dest: Path) -> DownloadError:
    parser = _PageParser()
    parser.feed(page)
    text = " ".join(parser.text)
    why = "the server returned a web page, not a checkpoint"
    if re.search(r"quota|too many users|exceeded", text, re.I):
        why += ": Google Drive's download quota for the file is used up for now (too many downloads)"
    elif re.search(r"sign.?in|log.?in|accounts\.google", page, re.I):
        why += ": a sign-in page"
    where = manual or url
    return DownloadError(
        f"{url}: {why}; nothing was saved. Download it in a browser from {where}, then either put it at {dest} or "
        f"pass it with --model PATH (Python: Separator(PATH))"
    )


def _opener() -> urllib.request.OpenerDirector:
    # build_opener keeps urllib's ProxyHandler (proxies from the environment); cookies carry Drive's confirmation
    return urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))


def _fetch(url: str, dest: Path, expected: str | None, progress: bool, timeout: float, manual: str | None,
           retries: int) -> str:
    """Download `url` to `dest` through `dest.part` (resumed when present); return the file's SHA-256.

    The server's validator (ETag or Last-Modified) of the first response is kept in `dest.part.json` and sent as
    If-Range when resuming, so a file that changed on the server in between is fetched whole, not spliced.
    """
    part = dest.with_name(dest.name + ".part")
    meta = dest.with_name(dest.name + ".part.json")
    opener = _opener()
    attempt = 0
    followed = 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"User-Agent": "bsmamba2"})
        resumable = url.startswith(("http://", "https://"))
        if have and resumable:
            request.add_header("Range", f"bytes={have}-")
            try:
                validator = json.loads(meta.read_text()).get("validator") if meta.is_file() else None
            except (OSError, ValueError):
                validator = None
            if validator:
                request.add_header("If-Range", validator)
        try:
            try:
                response = opener.open(request, timeout=timeout)
            except urllib.error.HTTPError as err:
                if err.code == 416 and have:  # range past the end: the .part is whole, or the file changed
                    total = re.match(r"bytes \*/(\d+)", err.headers.get("Content-Range", "") or "")
                    if total and int(total.group(1)) == have:
                        return _finish(part, dest, url, expected, have)
                    part.unlink()
                    continue
                if err.code in (401, 403, 429):
                    body = err.read(1 << 20).decode("utf-8", "replace")
                    raise _page_error(url, body, manual, dest) from None
                raise
            with response:
                kind = response.headers.get("Content-Type", "") or ""
                if "text/html" in kind:
                    body = response.read(1 << 21).decode("utf-8", "replace")
                    confirm = _confirmation_url(body, response.geturl())
                    if confirm and followed < 3:
                        log.info("%s: following the download confirmation page", url)
                        url, followed = confirm, followed + 1
                        continue
                    raise _page_error(url, body, manual, dest)
                status = getattr(response, "status", 200)
                if have and status == 206:
                    start = _content_range_start(response.headers.get("Content-Range", ""))
                    if start != have:
                        raise DownloadError(f"{url}: the server resumed at byte {start}, not {have}; delete {part} "
                                            "and try again")
                    log.info("resuming %s at %.1f MB", dest.name, have / 1e6)
                elif have:
                    have = 0  # the server sent the whole file again (it ignores ranges, or the file changed)
                if not have:
                    validator = response.headers.get("ETag") or response.headers.get("Last-Modified")
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    _write_json(meta, {"url": url, "validator": validator})
                length = response.headers.get("Content-Length")
                total = have + int(length) if length else None
                dest.parent.mkdir(parents=True, exist_ok=True)
                with open(part, "ab" if have else "wb") as out, tqdm(
                    total=total, initial=have, unit="B", unit_scale=True, desc=dest.name, disable=not progress,
                ) as bar:  # fmt: skip
                    while block := response.read(CHUNK):
                        out.write(block)
                        bar.update(len(block))
                size = part.stat().st_size
                if total is not None and size < total:
                    raise http.client.IncompleteRead(b"", total - size)
            return _finish(part, dest, url, expected, size)
        except (OSError, http.client.HTTPException) as err:
            if isinstance(err, urllib.error.HTTPError) and err.code < 500:
                raise DownloadError(f"could not download {url}: HTTP {err.code} {err.reason}; check the name or URL"
                                    + (f", or download it from {manual}" if manual else "")) from None
            got = part.stat().st_size if part.exists() else 0
            attempt += 1
            if got and resumable and attempt <= retries:
                log.warning("download of %s interrupted at %.1f MB (%s); resuming", dest.name, got / 1e6, err)
                continue
            if got and resumable:
                raise DownloadError(
                    f"could not download {url}: interrupted after {got / 1e6:.1f} MB ({err}); run the same command "
                    f"again to resume from {part}"
                ) from None
            raise DownloadError(
                f"could not download {url}: {err}; check the network (proxies come from https_proxy/http_proxy), or "
                f"download the file yourself{f' from {manual}' if manual else ''} and pass it with --model PATH"
            ) from None


def _content_range_start(value: str) -> int | None:
    match = re.match(r"bytes (\d+)-", value.strip())
    return int(match.group(1)) if match else None


def _finish(part: Path, dest: Path, url: str, expected: str | None, size: int) -> str:
    """Verify the completed `.part` and rename it into place; return its SHA-256."""
    if size == 0:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{url}: the server sent an empty file; nothing was saved")
    digest = sha256_file(part)
    if expected is not None and digest != expected:
        part.unlink(missing_ok=True)
        dest.with_name(dest.name + ".part.json").unlink(missing_ok=True)
        raise DownloadError(f"{url}: downloaded file has SHA-256 {digest}, expected {expected}; not saved (the "
                            "download was damaged, or the file changed): try again")
    os.replace(part, dest)
    dest.with_name(dest.name + ".part.json").unlink(missing_ok=True)
    return digest


def _unpack(path: Path) -> bool:
    """If `path` is a zip of training logs (not itself a torch checkpoint), replace it by the one checkpoint inside
    and return True."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        if any(n.endswith("data.pkl") for n in names):
            return False  # a torch checkpoint: torch.save writes zip archives
        ckpts = [n for n in names if n.endswith((".ckpt", ".safetensors", ".pt", ".pth"))]
        if len(ckpts) != 1:
            raise DownloadError(f"{path} is an archive holding {len(ckpts)} checkpoints ({', '.join(ckpts[:5])}); "
                                "extract the one you want and pass it with --model PATH")
        tmp = path.with_name(f".{path.name}.unpack")
        with archive.open(ckpts[0]) as src, open(tmp, "wb") as out:
            while block := src.read(CHUNK):
                out.write(block)
    os.replace(tmp, path)
    log.info("%s: unpacked %s from the downloaded archive", path, ckpts[0])
    return True


def download(
    name_or_url: str, dest: str | os.PathLike | None = None, sha256: str | None = None, progress: bool = True,
    timeout: float = 60.0, offline: bool | None = None, retries: int = 2, force: bool = False,
) -> Path:  # fmt: skip
    """Fetch a published checkpoint (by name, see `PUBLISHED`) or any URL (http, https, file) to `dest`.

    Args:
        dest: target file (default: the cache, under the published file name or the URL's).
        sha256: expected hash (default: the published one, if any; else the one recorded at an earlier download).
        retries: resumptions tried within this call after a dropped connection (the .part file also survives for
            the next call).
        force: fetch again even if an intact copy is cached.
    Returns:
        the local file. Reused without any network access when it is cached and its hash checks out.
    Raises:
        ValueError for an unknown name, DownloadError (a RuntimeError) with the fix for everything else.
    """
    manual = None
    if name_or_url in PUBLISHED:
        entry = PUBLISHED[name_or_url]
        url, filename, sha256, manual = entry.url, entry.filename, sha256 or entry.sha256, entry.page
        if os.environ.get(MIRROR_ENV):
            url = os.environ[MIRROR_ENV].rstrip("/") + "/" + filename
    elif "://" in name_or_url:
        url = name_or_url
        filename = Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path)).name or "model.ckpt"
    else:
        raise ValueError(f"unknown model {name_or_url!r}; known: {', '.join(PUBLISHED)} (or give a path, a URL or "
                         "hf://OWNER/REPO)")
    dest = Path(dest).expanduser() if dest is not None else cache_dir() / filename
    if not force and dest.is_file():
        if verify_cached(dest, sha256):
            log.debug("using %s (already downloaded)", dest)
            return dest
        if is_offline(offline):
            raise DownloadError(f"{dest} is damaged (its SHA-256 does not match the download's) and offline mode "
                                f"forbids fetching it again; unset {OFFLINE_ENV} / drop --offline, or run "
                                f"`bsmamba2 download {name_or_url}` on a connected machine")
        log.warning("fetching %s again", dest.name)
    if is_offline(offline):
        raise DownloadError(f"{name_or_url} is not in the cache ({dest} is missing) and offline mode forbids "
                            f"downloading it; run `bsmamba2 download {name_or_url}` on a connected machine and copy "
                            f"{dest} here{f' (or download {manual} in a browser)' if manual else ''}, or pass a "
                            "checkpoint with --model PATH")
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s -> %s", name_or_url if name_or_url in PUBLISHED else url, dest)
    digest = _fetch(url, dest, sha256, progress, timeout, manual, retries)
    try:
        if _unpack(dest):
            digest = sha256_file(dest)  # record the checkpoint's own hash, not the archive's
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    _record(dest, url, digest)
    log.info("saved %s (sha256 %s)", dest, digest)
    return dest


# -- the Hugging Face Hub ----------------------------------------------------------------------------------------------
HUB_WEIGHTS = (".safetensors", ".ckpt", ".pt", ".pth")


def _hub(spec: str, offline: bool, progress: bool) -> Path:
    """hf://OWNER/REPO[/FILE] -> a local file, through huggingface_hub (its cache under ours: <cache>/huggingface)."""
    rest = spec[len("hf://"):].strip("/")
    parts = rest.split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise ValueError(f"{spec}: expected hf://OWNER/REPO or hf://OWNER/REPO/FILE")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:]) or None
    try:
        import huggingface_hub  # noqa: PLC0415 - optional
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError  # noqa: PLC0415
    except ImportError:
        raise ValueError(f"{spec}: loading from the Hugging Face Hub needs huggingface_hub; "
                         "`pip install 'bsmamba2[hub]'`") from None
    endpoint = os.environ.get("HF_ENDPOINT") or None  # read now, so a change after import counts
    cache = cache_dir() / "huggingface"
    try:
        if filename is None:
            if offline:
                raise ValueError(f"{spec}: offline, the file inside the repo must be named: hf://{repo_id}/FILE")
            files = huggingface_hub.HfApi(endpoint=endpoint).list_repo_files(repo_id)
            weights = [f for f in files if f.endswith(HUB_WEIGHTS)]
            preferred = [f for f in weights if f.endswith(".safetensors")] or weights
            if len(preferred) != 1:
                raise ValueError(f"{spec}: the repo holds {len(weights)} checkpoint files ({', '.join(weights[:6])}); "
                                 f"name one: hf://{repo_id}/FILE")
            filename = preferred[0]
        path = huggingface_hub.hf_hub_download(
            repo_id, filename, cache_dir=cache, local_files_only=offline, endpoint=endpoint,
            **({} if progress else {"tqdm_class": _Silent}),
        )  # fmt: skip
    except LocalEntryNotFoundError:
        raise DownloadError(f"{spec} is not in the cache ({cache}) and offline mode forbids downloading it; run "
                            f"`bsmamba2 download {spec}` on a connected machine first") from None
    except HfHubHTTPError as err:
        raise DownloadError(f"could not fetch {spec} from the Hugging Face Hub: {' '.join(str(err).split())[:300]}; "
                            "check the repo and file names (private repos need `hf auth login`)") from None
    except OSError as err:
        raise DownloadError(f"could not fetch {spec}: {err}; check the network, or download the file and pass it "
                            "with --model PATH") from None
    return Path(path)


class _Silent(tqdm):
    def __init__(self, *args, **kwargs):
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


# -- names -> files -> models ------------------------------------------------------------------------------------------
def resolve(spec: str | os.PathLike | None = None, offline: bool | None = None, progress: bool = True) -> Path:
    """The local checkpoint file for a model name, path, URL or hf:// id (see the module docstring).

    None means `DEFAULT_MODEL`. Published names and URLs are downloaded on first use and verified on every use.
    """
    offline = is_offline(offline)
    text = DEFAULT_MODEL if spec is None else os.fspath(spec)
    if text == DEMO:
        path = default_checkpoint()
        if path is None:
            raise FileNotFoundError(f"this installation has no bundled demo model; use --model {DEFAULT_MODEL}")
        return path
    if text in PUBLISHED:
        return download(text, offline=offline, progress=progress)
    if text.startswith("hf://"):
        return _hub(text, offline, progress)
    if re.match(r"^[a-z][a-z0-9+.-]*://", text):
        return download(text, offline=offline, progress=progress)
    path = Path(text).expanduser()
    if not path.exists():
        if not any(c in text for c in "/\\.") and not path.suffix:
            raise ValueError(f"unknown model {text!r}: not a file, nor one of {', '.join([*PUBLISHED, DEMO])} (see "
                             "`bsmamba2 models`); give a checkpoint path, a URL or hf://OWNER/REPO")
        raise FileNotFoundError(f"checkpoint {path} not found; check the path, or use a model name such as "
                                f"{DEFAULT_MODEL} (see `bsmamba2 models`)")
    if path.is_dir():
        raise ValueError(f"checkpoint {path} is a folder; pass the .ckpt or .safetensors file inside it")
    return path


def model_from_file(path: str | os.PathLike, map_location="cpu"):
    """A model from a checkpoint file, every failure of a foreign file turned into one clear ValueError line."""
    from bsmamba2.checkpoint import load_model as _load  # noqa: PLC0415 - torch and the model only when needed

    path = Path(path)
    try:
        return _load(path, map_location=map_location)
    except (ModuleNotFoundError, ImportError):
        raise
    except Exception as err:  # noqa: BLE001 - any failure of a foreign file becomes one clear line
        detail = " ".join(str(err).split()) or type(err).__name__
        if len(detail) > 300:
            detail = detail[:297] + "..."
        if str(path) not in detail:
            detail = f"{path}: {detail}"
        if "expected" not in detail:
            detail += (" — pass a BSMamba2 or BS-RoFormer checkpoint (an official Lightning .ckpt or a bsmamba2 "
                       ".safetensors)")
        raise ValueError(f"checkpoint {detail}") from err


def load_model(spec: str | os.PathLike | None = None, map_location="cpu", offline: bool | None = None,
               progress: bool = True):
    """A ready model (eval mode) from a name, path, URL or hf:// id: what `Separator(spec)` loads.

    `bsmamba2.load_model("bsmamba2-musdb")` fetches the paper's weights on first use; `load_model("demo")` gives the
    bundled model; a path loads that file.
    """
    return model_from_file(resolve(spec, offline=offline, progress=progress), map_location).eval()


@dataclass(frozen=True)
class ModelEntry:
    """One line of `bsmamba2 models`."""

    name: str
    what: str
    scores: str
    size: str
    path: Path | None  # where it is (or would be) cached; the package file for the demo model
    cached: bool


def known_models() -> list[ModelEntry]:
    """The model names `resolve` knows, with what each is, its scores, its size and whether it is on this machine."""
    entries = []
    for p in PUBLISHED.values():
        path = cache_dir() / p.filename
        cached = path.is_file()
        size = f"{path.stat().st_size / 1e6:.0f} MB" if cached else (p.size_note if p.params else "not published")
        entries.append(ModelEntry(p.name, p.what, f"vocals cSDR {p.csdr:.2f} dB, uSDR {p.usdr:.2f} dB (paper)", size,
                                  path, cached))
    demo = default_checkpoint()
    entries.append(ModelEntry(
        DEMO, "small demo model bundled in the package, trained on synthetic songs only (not for real music)",
        "none on real music", f"{demo.stat().st_size / 1e6:.1f} MB" if demo else "not installed", demo,
        demo is not None,
    ))  # fmt: skip
    return entries
