"""Files and model folders written all or nothing: refusals, write errors, SIGKILL at every
point of a replacement, and the next run cleaning up after a killed one."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import mlx.core as mx
import pytest
from faults import kill_at

from mlx_smolvlm.utils import atomic

ROOT = Path(__file__).resolve().parents[2]


def fake_model(path: Path, tag: str) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"tag": tag}))
    (path / "model.safetensors").write_text(tag)
    return path


def tag(path: Path) -> str:
    return json.loads((path / "config.json").read_text())["tag"]


def write(target: Path, tag_: str, force: bool = True) -> None:
    with atomic.model_folder(target, force) as tmp:
        (tmp / "config.json").write_text(json.dumps({"tag": tag_}))
        (tmp / "model.safetensors").write_text(tag_)


def test_new_folder_is_created_readable_and_old_one_replaced(tmp_path):
    target = tmp_path / "out"
    write(target, "first", force=False)
    assert tag(target) == "first"
    assert target.stat().st_mode & 0o777 == 0o755  # not drwx------
    with pytest.raises(atomic.TargetError, match="already exists; pass --force"):
        write(target, "second", force=False)
    write(target, "second")
    assert tag(target) == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_folders_that_are_not_a_models_are_never_replaced(tmp_path):
    target = fake_model(tmp_path / "out", "old")
    (target / "notes.docx").write_text("mine")
    with pytest.raises(atomic.TargetError, match="not a model's"):
        write(target, "new")
    assert (target / "notes.docx").read_text() == "mine" and tag(target) == "old"
    plain = tmp_path / "plain"
    (plain / "sub").mkdir(parents=True)
    with pytest.raises(atomic.TargetError, match="not a model's"):
        write(plain, "new")
    (tmp_path / "file").write_text("x")
    with pytest.raises(atomic.TargetError, match="not a directory"):
        write(tmp_path / "file", "new")
    empty = tmp_path / "empty"
    empty.mkdir()
    write(empty, "new", force=False)  # an empty folder is as good as none
    assert tag(empty) == "new"


def test_target_around_inside_or_equal_to_the_source_is_refused(tmp_path):
    source = fake_model(tmp_path / "hub" / "model", "source")
    for target in (source, source.parent, source / "mlx"):
        with pytest.raises(atomic.TargetError, match="source checkpoint"):
            atomic.check_target(target, True, source, "--mlx-path")
    assert tag(source) == "source" and sorted(p.name for p in source.iterdir()) == [
        "config.json",
        "model.safetensors",
    ]


def test_disk_full_leaves_nothing_partial(tmp_path, monkeypatch):
    target = fake_model(tmp_path / "out", "old")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        with atomic.model_folder(target, True) as tmp:
            (tmp / "config.json").write_text("{}")
            full()
    assert tag(target) == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    monkeypatch.setattr(mx, "save_safetensors", full)
    with pytest.raises(OSError, match="No space left"):
        atomic.save_safetensors(tmp_path / "out" / "a.safetensors", {"x": mx.zeros(2)})
    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError, match="No space left"):
        atomic.write_text(tmp_path / "out" / "config.json", "{}")
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    assert tag(target) == "old"


def test_files_are_replaced_whole(tmp_path):
    file = tmp_path / "a.json"
    atomic.write_json(file, {"v": 1})
    atomic.write_json(file, {"v": 2})
    atomic.save_safetensors(tmp_path / "w.safetensors", {"x": mx.ones(3)})
    assert json.loads(file.read_text()) == {"v": 2}
    assert mx.load(str(tmp_path / "w.safetensors"))["x"].tolist() == [1, 1, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "w.safetensors"]


SCRIPT = """
import json, sys
from pathlib import Path
from mlx_smolvlm.utils import atomic
if sys.argv[2] == "no-exchange":
    atomic._exchange_function = lambda: None
with atomic.model_folder(Path(sys.argv[1]), force=True) as tmp:
    (tmp / "config.json").write_text(json.dumps({"tag": "new"}))
    (tmp / "model.safetensors").write_text("new")
"""


@pytest.mark.parametrize(
    "pause, mode, expected",
    [
        ("staged", "exchange", "old"),
        ("swapped", "exchange", "new"),
        ("staged", "no-exchange", "old"),
        ("between-renames", "no-exchange", None),  # repaired by the next run
        ("swapped", "no-exchange", "new"),
    ],
)
def test_sigkill_leaves_the_old_or_the_new_model(tmp_path, pause, mode, expected):
    target = fake_model(tmp_path / "out", "old")
    kill_at(pause, ["-c", SCRIPT, str(target), mode], {"PYTHONPATH": str(ROOT)})
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != "out")
    assert leftovers and all(name.startswith(".out.") for name in leftovers)
    if expected is None:
        assert not target.exists()  # two renames on a system without an atomic exchange
        atomic.recover(target)
        expected = "old"
    assert tag(target) == expected
    write(target, "next")  # the next run cleans what the killed one left
    assert tag(target) == "next"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_leftovers_of_a_live_writer_are_left_alone(tmp_path):
    target = fake_model(tmp_path / "out", "old")
    mine = tmp_path / f".out.{os.getpid()}.tmp"
    mine.mkdir()
    atomic.recover(target)
    assert mine.exists()
