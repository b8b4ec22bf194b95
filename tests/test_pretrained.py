"""The official UniverSeg weights: opt-in licence, download to a cache, verification.

Every download here is served by a loopback HTTP server (127.0.0.1) started inside the test;
no test touches the internet.
"""

from __future__ import annotations

import http.server
import io
import threading
import time

import pytest
import torch

from megaseg import create_model, hub
from megaseg.inference import Segmenter

WEIGHTS = "/weights/universeg_v1_nf64_ss64_STA.pt"


@pytest.fixture(scope="module")
def official_bytes() -> bytes:
    """A state dict with the released v1 names and shapes (random values), as torch.save writes."""
    torch.manual_seed(0)
    buf = io.BytesIO()
    torch.save(create_model("universeg_v1").state_dict(), buf)
    return buf.getvalue()


class _Server:
    """Serves ``files[path] = (body, declared_length)`` on 127.0.0.1 and logs each request;
    ``drip`` seconds > 0: the body goes out one byte at a time, that far apart; ``stall``
    bytes: that many go out at once, then nothing for a minute."""

    def __init__(self):
        self.files: dict[str, tuple[bytes, int]] = {}
        self.requests: list[str] = []
        self.drip = 0.0
        self.stall: int | None = None
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                if self.path not in server.files:
                    self.send_error(404)
                    return
                body, declared = server.files[self.path]
                self.send_response(200)
                self.send_header("Content-Length", str(declared))
                self.end_headers()
                if server.stall is not None:
                    self.wfile.write(body[: server.stall])
                    self.wfile.flush()
                    time.sleep(60)
                    return
                if not server.drip:
                    self.wfile.write(body)  # fewer bytes than declared: a cut connection
                    return
                try:
                    for i in range(len(body)):
                        self.wfile.write(body[i : i + 1])
                        self.wfile.flush()
                        time.sleep(server.drip)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up
                    pass

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def serve(self, path: str, body: bytes, declared: int | None = None) -> str:
        self.files[path] = (body, len(body) if declared is None else declared)
        return self.url(path)


@pytest.fixture
def server():
    s = _Server()
    s.thread.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """A fresh cache per test, and no local weights from the environment."""
    monkeypatch.setenv(hub.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.delenv(hub.ENV_WEIGHTS, raising=False)


def _cache_files(tmp_path) -> list[str]:
    root = tmp_path / "cache"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_without_opt_in_nothing_is_downloaded_and_the_licence_is_named(server, official_bytes):
    url = server.serve(WEIGHTS, official_bytes)
    for call in (
        lambda: create_model("universeg_v1", pretrained="official", url=url),
        lambda: Segmenter.from_pretrained("universeg-v1-official", "cpu"),
    ):
        with pytest.raises(
            hub.LicenseNotAccepted, match=r"OpenRAIL\+\+-M \(research use only\)"
        ) as e:
            call()
        assert "accept_license=True" in str(e.value)
    assert server.requests == []


def test_download_is_cached_and_loads_the_served_weights(server, official_bytes, tmp_path):
    url = server.serve(WEIGHTS, official_bytes)
    model = create_model("universeg_v1", pretrained="official", accept_license=True, url=url)
    expected = torch.load(io.BytesIO(official_bytes), weights_only=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    assert _cache_files(tmp_path) == ["universeg/universeg_v1_nf64_ss64_STA.pt"]
    assert server.requests == [WEIGHTS]
    again = create_model("universeg_v1", pretrained="official", accept_license=True, url=url)
    assert server.requests == [WEIGHTS]  # the cache answered
    assert all(torch.equal(again.state_dict()[k], v) for k, v in expected.items())


def test_segmenter_from_pretrained_uses_the_official_url(server, official_bytes, monkeypatch):
    monkeypatch.setattr(hub, "OFFICIAL_URL", server.serve(WEIGHTS, official_bytes))
    seg = Segmenter.from_pretrained("universeg-v1-official", "cpu", accept_license=True)
    assert seg.resolution == 128 and seg.card["license"] == hub.LICENSE_NAME
    assert server.requests == [WEIGHTS]


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("truncated", r"download failed \(IncompleteRead|download truncated"),
        ("garbage", r"not the UniverSeg v1 weights: .*not a readable torch weights file"),
        ("other_model", r"not the UniverSeg v1 weights: .*weights do not fit"),
        ("missing", r"download failed \(HTTP Error 404"),
    ],
)
def test_bad_download_is_refused_and_not_cached(server, official_bytes, tmp_path, damage, reason):
    if damage == "truncated":
        url = server.serve(WEIGHTS, official_bytes[: len(official_bytes) // 2], len(official_bytes))
    elif damage == "garbage":
        url = server.serve(WEIGHTS, bytes(range(256)) * 64)
    elif damage == "other_model":
        buf = io.BytesIO()
        torch.save(create_model("universeg_v1_small").state_dict(), buf)
        url = server.serve(WEIGHTS, buf.getvalue())
    else:
        url = server.url("/nothing.pt")
    with pytest.raises(hub.DownloadError, match=reason) as e:
        create_model("universeg_v1", pretrained="official", accept_license=True, url=url)
    assert url in str(e.value)
    assert _cache_files(tmp_path) == []  # no partial file, no temporary left behind


def test_local_file_for_offline_machines(server, official_bytes, tmp_path, monkeypatch):
    local = tmp_path / "offline.pt"
    local.write_bytes(official_bytes)
    url = server.url(WEIGHTS)  # would 404 if it were asked
    a = create_model(
        "universeg_v1", pretrained="official", accept_license=True, path=local, url=url
    )
    monkeypatch.setenv(hub.ENV_WEIGHTS, str(local))
    b = Segmenter.from_pretrained("universeg-v1-official", "cpu", accept_license=True).model
    assert server.requests == []
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


def test_official_weights_exist_only_for_v1():
    with pytest.raises(ValueError, match=r"pretrained='official' exists for 'universeg_v1' only"):
        create_model("universeg_v1_small", pretrained="official", accept_license=True)
    with pytest.raises(ValueError, match=r"unknown pretrained weights"):
        Segmenter.from_pretrained("universeg-v2", accept_license=True)


def test_a_server_dripping_bytes_hits_the_overall_deadline(
    server, official_bytes, tmp_path, monkeypatch, capsys
):
    """One byte every 20 ms never trips the per-read timeout (a plain download of the 4.7 MB
    file would take a day); the overall deadline ends it, shows progress, caches nothing."""
    server.drip = 0.02
    url = server.serve(WEIGHTS, official_bytes)
    monkeypatch.setattr(hub, "DOWNLOAD_DEADLINE_S", 1.0, raising=False)
    outcome: dict[str, BaseException] = {}

    def fetch():
        try:
            hub.official_weights(accept_license=True, url=url, timeout=5)
        except BaseException as e:  # handed to the test thread
            outcome["error"] = e

    start = time.monotonic()
    worker = threading.Thread(target=fetch, daemon=True)
    worker.start()
    worker.join(20)
    assert not worker.is_alive(), "no overall deadline: still downloading after 20 s"
    assert time.monotonic() - start < 15
    error = outcome.get("error")
    assert isinstance(error, hub.DownloadError), error
    assert "download not finished after 1 s" in str(error) and url in str(error)
    assert _cache_files(tmp_path) == []  # no weights, no partial file
    assert "downloading universeg_v1_nf64_ss64_STA.pt" in capsys.readouterr().err


def test_a_killed_download_leaves_a_partial_file_the_next_one_removes(
    server, official_bytes, tmp_path
):
    """kill -9 during the download (another process; the server sent 2.5 MB and stalls): its
    partial file stays beside the target; the next download into the cache removes it."""
    import os
    import signal
    import subprocess
    import sys

    server.stall = 5 * 2**19
    url = server.serve(WEIGHTS, official_bytes)
    folder = tmp_path / "cache" / "universeg"
    env = {**os.environ, hub.ENV_CACHE: str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    code = f"from megaseg import hub; hub.official_weights(accept_license=True, url={url!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            partial = (
                [p for p in folder.glob(".*") if p.stat().st_size > 0] if folder.is_dir() else []
            )
            if partial:
                break
            time.sleep(0.05)
        assert proc.poll() is None and partial, "the download never started"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert [p.name for p in folder.iterdir()] == [partial[0].name]  # left behind by the kill
    server.stall = None
    path = hub.official_weights(accept_license=True, url=url)
    assert sorted(p.name for p in folder.iterdir()) == [path.name]
