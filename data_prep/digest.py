"""``megaseg prep hash``: one digest of a corpus's content, however and wherever it was built.

Two corpora with the same digest hold the same data: a build in one process, with a local
pool, on ``local:N`` or on a remote Dask cluster, interrupted and resumed or not.

What goes in, per dataset: the bytes of its arrays (``images_R.npy``, ``labels_R.npy``,
``examples.npy``) and its ``index.json`` (subjects, splits, cases, tasks and their example
ranges, the spec record, the counts); from ``manifest.json``: the format version, the task
list and each dataset's entry. What stays out, because it does not define the data: the
reasons of skipped cases (they name input files by their path, and how a worker died; the
skipped cases themselves count), ``megaseg_version``, the renderings (``card.md``,
``preview.png``) and the files that hold checksums of the rest or the inputs' file times
(``checksums.json``, ``build_key.json``). No timestamp, host name or absolute path is stored
in what goes in.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from data_prep.store_writer import MANIFEST, dataset_dir
from megaseg.paths import sha256_file

ARRAY_SUFFIX = ".npy"


class DigestError(ValueError):
    """The folder is not a complete corpus (the message names the file); the CLI exits 2."""


def _canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


def _without_reasons(info: dict) -> dict:
    """A dataset's info (index.json / manifest) with only the ids of its skipped cases."""
    skipped = [{"case_id": s["case_id"]} for s in info.get("skipped", [])]
    return {**info, "skipped": skipped}


def dataset_digest(folder: Path) -> str:
    """sha256 of one consolidated dataset folder's data (see the module docstring)."""
    index_path = folder / "index.json"
    try:
        index = json.loads(index_path.read_text())
        index = {**index, "info": _without_reasons(index["info"])}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DigestError(f"{index_path}: unreadable dataset index ({err})") from None
    arrays = {p.name: sha256_file(p) for p in sorted(folder.glob(f"*{ARRAY_SUFFIX}"))}
    if "examples.npy" not in arrays:
        raise DigestError(f"{folder / 'examples.npy'}: missing")
    return hashlib.sha256(_canonical({"index": index, "arrays": arrays})).hexdigest()


def corpus_digest(out: str | Path) -> tuple[str, dict[str, str]]:
    """``(digest of the corpus, {dataset: digest})``; raises :class:`DigestError`."""
    out = Path(out)
    path = out / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        datasets = manifest["datasets"]
        record = {
            "format_version": manifest["format_version"],
            "tasks": manifest["tasks"],
            "datasets": {name: _without_reasons(d) for name, d in sorted(datasets.items())},
        }
    except FileNotFoundError:
        raise DigestError(f"{path}: missing: not a corpus, or an incomplete build") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise DigestError(f"{path}: not a readable manifest ({err})") from None
    each = {name: dataset_digest(dataset_dir(out, name)) for name in sorted(datasets)}
    digest = hashlib.sha256(_canonical({"manifest": record, "datasets": each})).hexdigest()
    return digest, each
