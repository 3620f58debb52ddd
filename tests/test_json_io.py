"""The one JSON reader and atomic writer (cloc_data.json_io)."""

import json

import pytest

from cloc_data.json_io import load_json, write_json_atomic


def test_write_json_atomic_passes_the_layout_through_and_creates_the_folder(tmp_path):
    path = tmp_path / "new" / "out.json"
    assert write_json_atomic(path, {"b": 1, "a": [1, 2]}, indent=1, sort_keys=True) == path
    assert path.read_text(encoding="utf-8") == '{\n "a": [\n  1,\n  2\n ],\n "b": 1\n}\n'
    write_json_atomic(path, {"é": 1}, ensure_ascii=False, separators=(",", ":"))
    assert path.read_text(encoding="utf-8") == '{"é":1}\n'
    assert load_json(path) == {"é": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.json"]  # no temporary file left


def test_a_failed_write_keeps_the_old_file_whole(tmp_path):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"rows": [1]})
    with pytest.raises(ValueError, match="Out of range float"):
        write_json_atomic(path, {"rows": [float("nan")]}, allow_nan=False)
    with pytest.raises(TypeError):
        write_json_atomic(path, {"rows": {object()}})
    assert json.loads(path.read_text()) == {"rows": [1]}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_load_json_names_the_bad_file(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        load_json(bad)
