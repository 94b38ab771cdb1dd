"""Models by name, fetched on first use: a real HTTP server on 127.0.0.1 (a thread) serves the shared official
fixture checkpoint. First use with progress, later use offline, a dropped connection resumed with Range, web pages
instead of files, Google Drive's confirmation page, a damaged cache, proxies, and the Hub through a local endpoint.
Nothing here touches the internet."""

from __future__ import annotations

import hashlib
import http.server
import json
import logging
import threading
import urllib.parse

import pytest
import torch

import bsmamba2
from bsmamba2 import pretrained
from bsmamba2.audio import read_audio, write_audio
from bsmamba2.cli import main
from bsmamba2.pretrained import DownloadError, download, resolve
from bsmamba2.separate import Separator

NAME = "bsmamba2-musdb"
COMMIT = "c0ffee" + "0" * 34

SIGN_IN = "<html><head><title>Google Drive</title></head><body>Sign in to continue to Google Drive</body></html>"
QUOTA = ("<html><body><h1>Google Drive - Quota exceeded</h1><p>Too many users have viewed or downloaded this file "
         "recently. Please try accessing the file again later.</p></body></html>")
CONFIRM = """<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head><body>
<p>Google Drive can't scan this file for viruses.</p>
<form id="download-form" action="/download-confirmed" method="get">
<input type="submit" value="Download anyway"/><input type="hidden" name="id" value="FILEID">
<input type="hidden" name="export" value="download"><input type="hidden" name="confirm" value="t">
<input type="hidden" name="uuid" value="1234-abcd"></form></body></html>"""


class Server:
    """A real HTTP server in a thread. Serves the checkpoint at /bsmamba2-musdb.ckpt (honouring Range), pages, a
    Drive-style confirmation flow, a forward-proxy path, and the two Hub endpoints hf_hub_download uses."""

    def __init__(self, data: bytes):
        self.data = data
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.drop_after: int | None = None  # bytes sent before the connection is cut, once
        self.file_page: str | None = None  # serve this HTML instead of the checkpoint
        self.closed = False
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self._handle(body=False)

            def do_GET(self):
                self._handle(body=True)

            def _send(self, code, body: bytes, kind: str, extra: dict | None = None, send_body: bool = True):
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if send_body:
                    self.wfile.write(body)

            def _file(self, send_body: bool, extra: dict | None = None):
                data, start = owner.data, 0
                etag = f'"{hashlib.sha256(data).hexdigest()[:16]}"'
                extra = {"ETag": etag, **(extra or {})}
                rng = self.headers.get("Range")
                if rng and self.headers.get("If-Range", etag) != etag:
                    rng = None  # the file changed since the part was fetched: send it whole
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        return self._send(416, b"", "text/plain", {"Content-Range": f"bytes */{len(data)}"})
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data) - start))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if not send_body:
                    return
                if owner.drop_after is not None:
                    cut, owner.drop_after = owner.drop_after, None
                    self.wfile.write(data[start:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)  # the connection drops midway
                    return
                self.wfile.write(data[start:])

            def _handle(self, body: bool):
                owner.requests.append((self.command, self.path, self.headers.get("Range")))
                url = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(url.query))
                path = url.path
                if path.endswith(f"/{NAME}.ckpt") or path == "/model.ckpt":
                    if owner.file_page is not None:
                        return self._send(200, owner.file_page.encode(), "text/html; charset=utf-8", send_body=body)
                    return self._file(body)
                if path == "/uc":  # Drive: a large file first answers with the "can't scan for viruses" page
                    return self._send(200, CONFIRM.encode(), "text/html; charset=utf-8", send_body=body)
                if path == "/download-confirmed":
                    if query == {"id": "FILEID", "export": "download", "confirm": "t", "uuid": "1234-abcd"}:
                        return self._file(body)
                    return self._send(403, b"bad token", "text/plain", send_body=body)
                if path == "/api/models/owner/repo/tree/main":  # the Hub: list the repo
                    listing = json.dumps([{"type": "file", "path": "model.ckpt", "size": len(owner.data),
                                           "oid": "1" * 40}, {"type": "file", "path": "README.md", "size": 3,
                                                              "oid": "2" * 40}]).encode()
                    return self._send(200, listing, "application/json", send_body=body)
                if path == "/owner/repo/resolve/main/model.ckpt":  # the Hub: the file
                    digest = hashlib.sha256(owner.data).hexdigest()
                    return self._file(body, {"ETag": f'"{digest}"', "X-Repo-Commit": COMMIT})
                return self._send(404, b"not found", "text/plain", send_body=body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def fetches(self) -> list[tuple[str, str, str | None]]:
        return [r for r in self.requests if r[0] == "GET"]

    def close(self):
        if self.closed:
            return
        self.closed = True
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(official_ckpt):
    s = Server(official_ckpt.read_bytes())
    yield s
    s.close()


@pytest.fixture
def cache(tmp_path, monkeypatch, server):
    """An empty cache, the published names fetched from the test server, and no proxy for 127.0.0.1."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("BSMAMBA2_CACHE", str(folder))
    monkeypatch.setenv("BSMAMBA2_MIRROR", server.url)
    monkeypatch.delenv("BSMAMBA2_OFFLINE", raising=False)
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    return folder


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_first_use_downloads_with_progress_then_works_offline(cache, server, official_ckpt, capsys):
    path = resolve(NAME)  # no model on this machine yet: fetched, with a progress bar
    assert path == cache / f"{NAME}.ckpt"
    assert path.read_bytes() == official_ckpt.read_bytes()
    record = json.loads((cache / f"{NAME}.ckpt.json").read_text())
    assert record["sha256"] == hashlib.sha256(official_ckpt.read_bytes()).hexdigest()
    assert record["size"] == official_ckpt.stat().st_size
    assert _leftovers(cache) == [f"{NAME}.ckpt", f"{NAME}.ckpt.json"]  # no .part left
    bar = capsys.readouterr().err
    assert f"{NAME}.ckpt" in bar and "100%" in bar
    assert len(server.fetches()) == 1

    server.close()  # from now on the network is gone
    sep = Separator(NAME, device="cpu", segment=0, offline=True)  # the same name: the cached file, verified
    assert sep.checkpoint_path == path
    out = sep.separate(0.1 * torch.randn(2, 4410), 44100)
    assert out["vocals"].shape == (2, 4410)
    model = bsmamba2.load_model(NAME, offline=True)
    assert not model.training
    assert torch.equal(next(model.parameters()), next(sep.model.parameters()).cpu())
    assert len(server.fetches()) == 1


def test_fine_tuning_starts_from_a_published_model_fetched_by_name(cache, server, official_ckpt, tiny_musdb,
                                                                   tmp_path):
    """`train.init_from: bsmamba2-musdb` fetches the paper's weights once (here the official-format fixture from the
    local server) and the run starts from them: at lr 0 one step leaves the model equal to the checkpoint's."""
    import dataclasses

    from bsmamba2.train import train
    from bsmamba2.trainconfig import load_run_config

    official = bsmamba2.load_model(official_ckpt)
    config = load_run_config("tiny", [f"data.root={tiny_musdb}", f"train.init_from={NAME}", "train.lr=0",
                                      "train.max_steps=1", "train.device=cpu", "data.segment_seconds=0.25",
                                      "data.valid_max_excerpts=1", "train.batch_size=1", "train.effective_batch=1",
                                      "train.epoch_samples=1", "train.valid_batch_size=1"])
    config = dataclasses.replace(config, model=official.config)  # the checkpoint's size (inferred from its weights)
    result = train(config, tmp_path / "run")
    assert len(server.fetches()) == 1 and (cache / f"{NAME}.ckpt").is_file()
    mine, theirs = result.model.state_dict(), official.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_offline_says_what_is_missing_and_never_connects(cache, server, monkeypatch):
    monkeypatch.setenv("BSMAMBA2_OFFLINE", "1")
    with pytest.raises(DownloadError, match=rf"{NAME} is not in the cache .*{NAME}.ckpt is missing.*offline.*"
                                            rf"bsmamba2 download {NAME}.*drive.google.com.*--model PATH"):
        resolve(NAME)
    with pytest.raises(DownloadError, match="not in the cache"):
        Separator(device="cpu")  # the default model is the paper's
    assert server.requests == [] and _leftovers(cache) == []


def test_dropped_connection_resumes_with_range(cache, server, official_ckpt):
    data = official_ckpt.read_bytes()
    cut = len(data) // 3
    server.drop_after = cut
    with pytest.raises(DownloadError, match=r"interrupted after .* run the same command again to resume"):
        download(NAME, retries=0, progress=False)
    part = cache / f"{NAME}.ckpt.part"
    assert part.stat().st_size == cut and not (cache / f"{NAME}.ckpt").exists()
    path = download(NAME, progress=False)  # the next try asks only for the rest
    assert server.fetches()[-1][2] == f"bytes={cut}-"
    assert path.read_bytes() == data and not part.exists()
    # within one call, a dropped connection is resumed right away
    path.unlink()
    server.drop_after = cut
    assert download(NAME, progress=False).read_bytes() == data
    assert server.fetches()[-1][2] == f"bytes={cut}-"
    # a file that changed on the server between two tries is fetched whole (If-Range), never spliced
    path.unlink()
    server.drop_after = cut
    with pytest.raises(DownloadError, match="interrupted"):
        download(NAME, retries=0, progress=False)
    server.data = data[::-1]
    assert download(NAME, progress=False).read_bytes() == data[::-1]
    assert _leftovers(cache) == [f"{NAME}.ckpt", f"{NAME}.ckpt.json"]
    # a whole .part left by a crash just before the rename is finished without fetching again (416 = nothing left)
    path.rename(part)
    assert download(NAME, progress=False).read_bytes() == data[::-1]
    assert server.fetches()[-1][2] == f"bytes={len(data)}-"
    # a .part longer than the file on the server (it shrank) is dropped and the file fetched whole
    path.unlink()
    part.write_bytes(data + b"x" * 10)
    assert download(NAME, progress=False).read_bytes() == data[::-1]


@pytest.mark.parametrize("page, why", [
    (SIGN_IN, "returned a web page, not a checkpoint: a sign-in page"),
    (QUOTA, r"web page, not a checkpoint: Google Drive's download quota for the file is used up for now"),
    ("<html><body>Hello</body></html>", "returned a web page, not a checkpoint"),
])
def test_a_web_page_instead_of_the_file_is_a_clear_error_and_caches_nothing(cache, server, page, why):
    server.file_page = page
    with pytest.raises(DownloadError, match=rf"{why}.*; nothing was saved. Download it in a browser from "
                                            r"https://drive.google.com/file/d/.*--model PATH") as err:
        Separator(NAME, device="cpu")
    assert "\n" not in str(err.value)
    assert _leftovers(cache) == []


def test_drive_confirmation_page_is_followed(tmp_path, cache, server, official_ckpt):
    dest = download(f"{server.url}/uc?id=FILEID&export=download", tmp_path / "m.ckpt", progress=False)
    assert dest.read_bytes() == official_ckpt.read_bytes()
    assert [urllib.parse.urlsplit(p).path for _, p, _ in server.fetches()] == ["/uc", "/download-confirmed"]


def test_damaged_cache_is_detected_and_fetched_again(cache, server, official_ckpt, monkeypatch, caplog):
    path = resolve(NAME, progress=False)
    data = official_ckpt.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    with caplog.at_level(logging.WARNING, logger="bsmamba2"):
        assert resolve(NAME, progress=False).read_bytes() == data
    assert any("damaged" in r.getMessage() for r in caplog.records)
    assert len(server.fetches()) == 2
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # same size, one byte changed
    path.write_bytes(bytes(flipped))
    monkeypatch.setenv("BSMAMBA2_OFFLINE", "1")
    with pytest.raises(DownloadError, match="damaged.*offline mode forbids fetching it again"):
        resolve(NAME)
    monkeypatch.delenv("BSMAMBA2_OFFLINE")
    assert resolve(NAME, progress=False).read_bytes() == data
    assert len(server.fetches()) == 3


def test_a_file_placed_in_the_cache_by_hand_is_trusted_once_then_checked(cache, official_ckpt, server):
    cache.mkdir()
    (cache / f"{NAME}.ckpt").write_bytes(official_ckpt.read_bytes())
    assert resolve(NAME, offline=True) == cache / f"{NAME}.ckpt"
    assert json.loads((cache / f"{NAME}.ckpt.json").read_text())["sha256"] == pretrained.sha256_file(official_ckpt)
    assert server.requests == []


def test_proxies_come_from_the_environment(cache, server, official_ckpt, monkeypatch, tmp_path):
    # the test server doubles as a forward proxy: it answers the absolute URL a client sends to a proxy
    monkeypatch.setenv("http_proxy", server.url)
    monkeypatch.setenv("no_proxy", "")
    dest = download(f"http://models.example.invalid/{NAME}.ckpt", tmp_path / "via-proxy.ckpt", progress=False)
    assert dest.read_bytes() == official_ckpt.read_bytes()
    assert server.fetches()[0][1] == f"http://models.example.invalid/{NAME}.ckpt"


def test_hub_ids_through_a_local_endpoint(cache, server, official_ckpt, monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    path = resolve("hf://owner/repo", progress=False)  # the one checkpoint file of the repo
    assert path.read_bytes() == official_ckpt.read_bytes()
    assert path.is_relative_to(cache / "huggingface")
    server.close()
    assert resolve("hf://owner/repo/model.ckpt", offline=True) == path
    sep = Separator("hf://owner/repo/model.ckpt", device="cpu", segment=0, offline=True)
    assert sep.checkpoint_path == path
    with pytest.raises(DownloadError, match="hf://owner/repo/other.ckpt is not in the cache"):
        resolve("hf://owner/repo/other.ckpt", offline=True)
    with pytest.raises(ValueError, match="expected hf://OWNER/REPO"):
        resolve("hf://just-owner")


def test_names_paths_and_mistakes(tmp_path, cache, official_ckpt):
    assert resolve("demo") == pretrained.default_checkpoint()
    assert resolve(official_ckpt) == official_ckpt
    with pytest.raises(ValueError, match=r"unknown model 'bsmamba3'.*bsmamba2-musdb.*bsmamba2 models"):
        resolve("bsmamba3")
    with pytest.raises(FileNotFoundError, match="nope.ckpt not found"):
        resolve(tmp_path / "nope.ckpt")
    with pytest.raises(ValueError, match="is a folder"):
        resolve(tmp_path)
    with pytest.raises(ValueError, match="give the model once"):
        Separator("demo", checkpoint="demo")
    assert Separator(checkpoint="demo", device="cpu").checkpoint_path == pretrained.default_checkpoint()


def test_cli_separates_with_the_default_model_fetched_once(cache, server, sample_track, tmp_path, capsys):
    wave, sr = read_audio(sample_track / "mixture.wav")
    song = write_audio(tmp_path / "song.wav", wave[:, sr : sr + sr // 4], sr)
    assert main(["download", NAME, "-q"]) == 0  # pre-fetch, as for a machine that goes offline later
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    assert f"cached: {cache / (NAME + '.ckpt')}" in listing and "cSDR 11.03 dB" in listing
    server.close()
    out = tmp_path / "out"
    assert main(["separate", str(song), "-o", str(out), "--segment", "0", "--offline", "-q"]) == 0  # no --model
    assert read_audio(out / "song" / "vocals.wav")[0].shape == (2, sr // 4)
    manifest = json.loads((out / "manifest.json").read_text())
    (entry,) = manifest["files"].values()
    assert entry["checkpoint"] == str(cache / f"{NAME}.ckpt")
    assert entry["checkpoint_sha256"] == pretrained.sha256_file(cache / f"{NAME}.ckpt")
