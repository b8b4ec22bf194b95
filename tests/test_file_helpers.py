"""The one set of file helpers (megaseg/paths.py) that megaseg and data_prep write through, and
the old import paths of names that moved in issue #25 (one release, with a DeprecationWarning)."""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path

import pytest

from megaseg import paths


def test_atomic_write_fsyncs_the_data_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "out.json"
    paths.atomic_write_json(target, {"b": 1, "a": [1, 2]})
    assert target.read_text() == '{\n "a": [\n  1,\n  2\n ],\n "b": 1\n}\n'
    kinds = [kind for kind, _ in events]
    assert kinds == ["fsync", "replace", "fsync"]
    assert Path(events[0][1]).parent == tmp_path and Path(events[0][1]) != target  # temporary
    assert events[2][1] == str(tmp_path.resolve())  # the folder, after the rename
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "keep.txt"
    target.write_text("old")

    def fail(tmp):
        Path(tmp).write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        paths.atomic_write(target, fail)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_cache_dir_expands_home_and_joins_parts(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MEGASEG_CACHE", "~/cache")
    assert paths.cache_dir("packages") == tmp_path / "cache" / "packages"
    monkeypatch.delenv("MEGASEG_CACHE")
    assert paths.cache_dir() == tmp_path / ".cache" / "megaseg"


def test_store_writer_writes_through_the_one_atomic_write(tmp_path, monkeypatch):
    from data_prep import store_writer

    seen = []
    real = paths.atomic_write
    monkeypatch.setattr(paths, "atomic_write", lambda p, w, **kw: (seen.append(p), real(p, w)))
    store_writer.make_work_dir(tmp_path)
    assert seen == [tmp_path / store_writer.WORK_DIR / store_writer.WORK_MARKER]


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("megaseg.checkpoint:atomic_write", "megaseg.paths:atomic_write"),
        ("data_prep.store_writer:atomic_write_json", "megaseg.paths:atomic_write_json"),
        ("data_prep.store_writer:fsync_dir", "megaseg.paths:fsync_path"),
        ("data_prep.store_writer:check_dataset_name", "data_prep.specs.base:check_dataset_name"),
        ("data_prep.store_writer:write_dataset", "data_prep.pipeline:write_dataset"),
        ("data_prep.pipeline:assign_splits", "data_prep.splits:assign_splits"),
        ("data_prep.pipeline:subject_unit", "data_prep.splits:subject_unit"),
        ("megaseg.models.registry:create_model", "megaseg.models.factory:create_model"),
        ("megaseg.data.tasks:CorpusSource", "megaseg.data.tasks:CorpusTaskSource"),
        ("data_prep.fetch:cache_dir", "data_prep.packages:packages_dir"),
        ("megaseg.data.tasks:SyntheticSource", "megaseg.data.tasks:SyntheticTaskSource"),
    ],
)
def test_old_import_paths_warn_and_give_the_moved_object(old, new):
    """Names that moved (issue #25) stay one release at their old path, with a warning naming
    the new home."""
    (old_module, old_name), (new_module, new_name) = (x.split(":") for x in (old, new))
    expected = getattr(importlib.import_module(new_module), new_name)
    with pytest.warns(DeprecationWarning, match=re.escape(f"{new_module}.{new_name}")):
        assert getattr(importlib.import_module(old_module), old_name) is expected


def test_old_store_writer_atomic_write_keeps_its_file_object_convention(tmp_path):
    from data_prep import store_writer

    with pytest.warns(DeprecationWarning, match=r"megaseg\.paths\.atomic_write"):
        old = store_writer.atomic_write
    old(tmp_path / "x.bin", lambda f: f.write(b"abc"))
    assert (tmp_path / "x.bin").read_bytes() == b"abc"


def test_package_cache_is_the_one_cache_dir(monkeypatch, tmp_path):
    from data_prep.packages import Package, archives_dir, packages_dir, unpacked_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MEGASEG_CACHE", "~/c")  # the old data_prep copy did not expand ~
    assert packages_dir() == paths.cache_dir("packages") == tmp_path / "c" / "packages"
    assert archives_dir() == tmp_path / "c" / "packages" / "archives"
    pkg = Package("wheel", "demo", "1.0")
    assert unpacked_dir(pkg) == tmp_path / "c" / "packages" / "wheel" / "demo-1.0"
