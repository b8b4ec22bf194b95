"""The official UniverSeg v1 weights, downloaded on request to a cache and verified.

    model = create_model("universeg_v1", pretrained="official", accept_license=True)
    seg = Segmenter.from_pretrained("universeg-v1-official", accept_license=True)

The weights released by the UniverSeg authors are the strongest public model for this network,
but they come under a research-only licence, so megaseg never fetches them on its own: the
caller opts in with ``accept_license=True``. The file is downloaded once with urllib to
``$MEGASEG_CACHE`` (default ``~/.cache/megaseg``) under ``universeg/``; the download goes to a
temporary file beside its target, is read with the safe loader (``torch.load(weights_only=
True)``), checked for the v1 state-dict names and shapes and for finite values, and only then
moved into place, so a truncated or garbage download never stays in the cache. Offline
machines pass the file they have: ``path=`` or ``$MEGASEG_UNIVERSEG_WEIGHTS``. The download
shows its progress (bytes, rate) on stderr and gives up after an overall deadline
(:data:`DOWNLOAD_DEADLINE_S`): a per-read timeout alone never trips on a server that sends a
byte now and then.
"""

from __future__ import annotations

import http.client
import logging
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from torch import nn

from megaseg.checkpoint import (
    CheckpointError,
    build_model,
    check_finite,
    check_shapes,
    load_checkpoint,
    load_torch_state_dict,
    torch_shapes,
)
from megaseg.paths import ENV_CACHE, atomic_write, cache_dir  # noqa: F401 (hub API too)

OFFICIAL_NAME = "universeg-v1-official"
OFFICIAL_MODEL = "universeg_v1"
OFFICIAL_URL = (
    "https://github.com/JJGO/UniverSeg/releases/download/weights/universeg_v1_nf64_ss64_STA.pt"
)
OFFICIAL_RESOLUTION = 128  # the released network was trained on 128x128 inputs
LICENSE_NAME = "OpenRAIL++-M (research use only)"
LICENSE_NOTE = (
    f"The official UniverSeg weights are released by their authors under the {LICENSE_NAME} "
    "licence: research use only, with the use restrictions of that licence; read it at "
    "https://github.com/JJGO/UniverSeg before using them."
)
ENV_WEIGHTS = "MEGASEG_UNIVERSEG_WEIGHTS"
# The released file is ~4.7 MB; a response far larger than that is not it.
MAX_DOWNLOAD_BYTES = 64 * 2**20
# The whole download must end within this many seconds (4.7 MB: 10 min is ~8 KB/s); each read
# also has its own timeout, so a stalled one ends within both.
DOWNLOAD_DEADLINE_S = 600.0

log = logging.getLogger(__name__)
_license_shown = False


class LicenseNotAccepted(ValueError):
    """The official weights were asked for without ``accept_license=True``."""


class DownloadError(CheckpointError):
    """The official weights could not be downloaded, or the download is not the v1 weights."""


def require_license(accept_license: bool) -> None:
    """Refuse unless the caller opted in; show the licence once per process when they do."""
    global _license_shown
    if not accept_license:
        raise LicenseNotAccepted(
            f"{LICENSE_NOTE} megaseg downloads and loads them only if you accept it: pass "
            "accept_license=True (Segmenter.from_pretrained('universeg-v1-official', "
            "accept_license=True) or create_model('universeg_v1', pretrained='official', "
            "accept_license=True))."
        )
    if not _license_shown:
        log.warning("%s", LICENSE_NOTE)
        _license_shown = True


def verify_official(path: str | os.PathLike, source: str | None = None) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a tensors-only v1 state dict with the
    released names and shapes and finite values. ``source`` (a URL) is named in the error."""
    where = f"{source} (downloaded)" if source else f"{path}"
    try:  # shapes first, on "meta": a deflated forgery must not inflate before it is refused
        check_shapes(build_model(OFFICIAL_MODEL, {}, path, device="meta"), torch_shapes(path), path)
        check_finite(load_torch_state_dict(path), path)
    except CheckpointError as e:
        raise DownloadError(f"{where}: not the UniverSeg v1 weights: {e}") from e


def official_weights(
    *,
    accept_license: bool = False,
    path: str | os.PathLike | None = None,
    url: str | None = None,
    cache: str | os.PathLike | None = None,
    timeout: float = 60.0,
    deadline: float | None = None,
) -> Path:
    """The local file of the official v1 weights: ``path`` / ``$MEGASEG_UNIVERSEG_WEIGHTS``
    if given, else the cached download (fetched from ``url`` on first use).

    Raises:
        LicenseNotAccepted: without ``accept_license=True``.
        FileNotFoundError: a local ``path`` that does not exist.
        DownloadError: the download failed or is not the v1 weights (nothing is cached).
    """
    require_license(accept_license)
    local = path if path is not None else os.environ.get(ENV_WEIGHTS)
    url = url or OFFICIAL_URL
    if local:
        local = Path(local).expanduser()
        if not local.is_file():
            raise FileNotFoundError(f"{local}: no such file (the official UniverSeg weights)")
        return local
    target = Path(cache).expanduser() if cache else cache_dir()
    target = target / "universeg" / Path(urllib.request.urlparse(url).path).name
    if not target.is_file():
        download(url, target, timeout, deadline)
    return target


def download(url: str, target: Path, timeout: float = 60.0, deadline: float | None = None) -> Path:
    """Fetch ``url`` to ``target`` atomically, verified by :func:`verify_official` first.

    ``timeout``: seconds one read may wait; ``deadline``: seconds the whole download may take
    (default :data:`DOWNLOAD_DEADLINE_S`), checked after every read.
    """
    from tqdm.auto import tqdm

    from megaseg.progress import progress_options

    deadline = DOWNLOAD_DEADLINE_S if deadline is None else float(deadline)
    log.warning("downloading %s to %s", url, target)
    start = time.monotonic()

    def fetch(tmp: str) -> None:
        with open(tmp, "wb") as out:
            request = urllib.request.Request(url, headers={"User-Agent": "megaseg"})
            with (
                urllib.request.urlopen(request, timeout=min(timeout, deadline)) as response,
                tqdm(desc=f"downloading {target.name}", unit="B", unit_scale=True,
                     total=_length(response), leave=False, **progress_options()) as bar,
            ):  # fmt: skip
                expected = response.headers.get("Content-Length")
                total = 0
                # read1: what has arrived (a plain read waits for the whole MB, however slow)
                while chunk := response.read1(2**20):
                    total += len(chunk)
                    if total > MAX_DOWNLOAD_BYTES:
                        raise DownloadError(
                            f"{url}: more than {MAX_DOWNLOAD_BYTES // 2**20} MB, not the v1 weights"
                        )
                    out.write(chunk)
                    bar.update(len(chunk))
                    if time.monotonic() - start > deadline:
                        raise DownloadError(
                            f"{url}: download not finished after {deadline:g} s ({total} of "
                            f"{expected or 'unknown'} bytes); the server is too slow. Try again "
                            f"later, or fetch the file yourself and pass it with path= or "
                            f"${ENV_WEIGHTS}"
                        )
            if expected is not None and total != int(expected):
                raise DownloadError(
                    f"{url}: download truncated ({total} of {expected} bytes); try again"
                )
        verify_official(tmp, url)

    try:
        atomic_write(target, fetch, suffix=".part")  # a failed download leaves no file
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as e:
        raise DownloadError(
            f"{url}: download failed ({e}); on a machine without internet, pass the file with "
            f"path= or ${ENV_WEIGHTS}"
        ) from e
    return target


def _length(response) -> int | None:
    value = response.headers.get("Content-Length")
    return int(value) if value is not None and value.isdigit() else None


def load_official(
    name: str = OFFICIAL_MODEL,
    *,
    accept_license: bool = False,
    path: str | os.PathLike | None = None,
    url: str | None = None,
    cache: str | os.PathLike | None = None,
    timeout: float = 60.0,
    deadline: float | None = None,
    **kwargs,
) -> nn.Module:
    """``universeg_v1`` (``kwargs`` to its builder, e.g. ``fast=False``) with the official
    weights, loaded strictly and checked like any checkpoint (see :func:`official_weights`)."""
    if name != OFFICIAL_MODEL:
        raise ValueError(
            f"pretrained='official' exists for {OFFICIAL_MODEL!r} only (the released weights), "
            f"not {name!r}"
        )
    weights = official_weights(
        accept_license=accept_license,
        path=path,
        url=url,
        cache=cache,
        timeout=timeout,
        deadline=deadline,
    )
    model, _ = load_checkpoint(weights, build_model(name, kwargs, weights))
    return model


def official_card(weights: str | os.PathLike) -> dict:
    """What megaseg knows of the official weights, as a checkpoint card (its preprocessing:
    megaseg's one path at the official resolution, any modality)."""
    from megaseg.preprocess import card_fields

    return {
        "model": {"name": OFFICIAL_MODEL, "kwargs": {}},
        "resolution": OFFICIAL_RESOLUTION,
        "preprocessing": card_fields(OFFICIAL_RESOLUTION),
        "source": OFFICIAL_URL,
        "weights_file": str(weights),
        "license": LICENSE_NAME,
        "notes": "released by the UniverSeg authors, trained on MegaMedical (53 datasets) at "
        "support size 64; its training datasets are not listed here, so held-out status is "
        "not checked by megaseg evaluate",
    }


__all__ = [
    "LICENSE_NAME",
    "OFFICIAL_NAME",
    "OFFICIAL_URL",
    "DownloadError",
    "LicenseNotAccepted",
    "cache_dir",
    "load_official",
    "official_weights",
]
