"""`read_json`: every way a JSON config file can be broken is one line naming the file."""

from __future__ import annotations

import pytest

from mlx_smolvlm.utils.validation import read_json


def test_read_json_returns_the_object(tmp_path):
    file = tmp_path / "config.json"
    file.write_text('{"name": "caf\u00e9", "layers": [1, 2]}', encoding="utf-8")
    assert read_json(file) == {"name": "caf\u00e9", "layers": [1, 2]}


def test_a_missing_file_is_file_not_found(tmp_path):
    file = tmp_path / "config.json"
    with pytest.raises(FileNotFoundError) as err:
        read_json(file)
    assert str(err.value) == f"{file}: not found"


@pytest.mark.parametrize(
    "content, problem",
    [
        (b'{"name": "caf\xe9"}', "invalid JSON: not UTF-8 (byte 0xe9 at offset 13)"),
        (b'{\n  "a": 1,\n  "b": }', "invalid JSON: Expecting value at line 3, column 8"),
        (b"", "invalid JSON: Expecting value at line 1, column 1"),
        (b"[" * 100_000, "invalid JSON: nested too deeply"),
        (b"[1, 2]", "expected a JSON object, got list"),
        (b'"text"', "expected a JSON object, got str"),
    ],
)
def test_each_problem_is_one_line_naming_the_file(tmp_path, content, problem):
    file = tmp_path / "config.json"
    file.write_bytes(content)
    with pytest.raises(ValueError) as err:
        read_json(file)
    assert str(err.value) == f"{file}: {problem}"


def test_an_unreadable_path_names_the_file(tmp_path):
    folder = tmp_path / "config.json"
    folder.mkdir()
    with pytest.raises(ValueError, match="config.json: cannot read it") as err:
        read_json(folder)
    assert str(err.value).startswith(str(folder)) and "\n" not in str(err.value)


class BrokenAdapter(ValueError):
    """A caller's own error class."""


def test_the_caller_chooses_the_error_class(tmp_path):
    file = tmp_path / "adapter_config.json"
    file.write_text("{")
    with pytest.raises(BrokenAdapter, match=r"adapter_config.json: invalid JSON"):
        read_json(file, BrokenAdapter)
