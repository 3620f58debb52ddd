"""``cloc-data``'s answer to each mistake a user can make, and RefCOCO's protection of its evaluation splits.

Each error ends as one line ``cloc-data: error: <file>: <what happened and what to do>`` with exit
status 2 (the command line is wrong) or 1 (the input cannot be used), never a traceback. The
RefCOCO fixtures follow the refer toolkit's published layout (``refs(unc).p``: a pickled list of
``{ref_id, ann_id, image_id, split, category_id, sent_ids, sentences: [{sent_id, sent, raw,
tokens}]}``, with a COCO ``instances.json`` beside it) and lmms-lab's hub files
(``val-00000-of-00001.parquet`` with ``question_id, image, question, answer, segmentation, bbox,
iscrowd, file_name``).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from cloc_data.cli import main as cli_main
from cloc_data.loader import RegionTextDataset, StreamingRegionTextDataset
from cloc_data.shards import iter_shard_samples

ROOT = Path(__file__).resolve().parents[1]


def run_cli(argv, capsys):
    """``(exit status, stdout, stderr)`` of ``cloc-data`` run in this process."""
    try:
        code = cli_main([str(a) for a in argv])
    except SystemExit as stop:  # argparse's own errors
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    """The one error line: the last line of stderr, which must be the only ``cloc-data: error:`` line."""
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("cloc-data: error:")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    return errors[0]


def jpeg(size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (90, 90, 200)).save(buf, format="JPEG")
    return buf.getvalue()


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def refer_folder(tmp_path: Path, refs=None) -> Path:
    folder = tmp_path / "refcoco"
    folder.mkdir()
    instances = {
        "images": [
            {"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "width": 40, "height": 30},
            {"id": 2, "file_name": "COCO_train2014_000000000002.jpg", "width": 40, "height": 30},
        ],
        "annotations": [
            {"id": 11, "image_id": 1, "bbox": [2, 3, 10, 12], "category_id": 1},
            {"id": 21, "image_id": 2, "bbox": [5, 5, 20, 10], "category_id": 1},
        ],
        "categories": [{"id": 1, "name": "person"}],
    }
    (folder / "instances.json").write_text(json.dumps(instances))

    def ref(ref_id, ann_id, image_id, split, text):
        sentence = {"sent_id": ref_id, "sent": text, "raw": text, "tokens": text.split()}
        return {"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": split, "category_id": 1,
                "sent_ids": [ref_id], "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
                "sentences": [sentence]}  # fmt: skip

    refs = refs or [ref(0, 11, 1, "train", "man on the left"), ref(1, 21, 2, "testA", "woman in red")]
    (folder / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    images = tmp_path / "train2014"
    images.mkdir()
    for image in instances["images"]:
        (images / image["file_name"]).write_bytes(jpeg())
    return folder


# --- one line, right exit status, for each user error ----------------------------------------------


def test_input_that_does_not_exist(tmp_path, capsys):
    missing = tmp_path / "nope.json"
    code, _, err = run_cli(
        ["convert", "--format", "coco", "--input", missing, "--out", tmp_path / "o"], capsys
    )
    assert code == 2
    assert error_line(err).startswith(f"cloc-data: error: {missing}: does not exist; --input takes a COCO")


def test_tar_given_where_json_is_read(tmp_path, capsys):
    shard = write_tar(tmp_path / "00000.tar", {"000000000.jpg": jpeg(), "000000000.json": b"{}"})
    code, _, err = run_cli(["convert", "--format", "coco", "--input", shard, "--out", tmp_path / "o"], capsys)
    assert code == 2
    line = error_line(err)
    assert line.startswith(f"cloc-data: error: {shard}: is a tar archive, but --format coco reads")
    assert "--format grit" in line
    # the same with RefCOCO (rows expected) and a gzip
    code, _, err = run_cli(
        ["convert", "--format", "refcoco", "--split", "val", "--input", shard, "--out", tmp_path / "o"],
        capsys,
    )
    assert code == 2 and "is a tar archive, but --format refcoco reads" in error_line(err)
    gz = tmp_path / "instances.json.gz"
    gz.write_bytes(b"\x1f\x8b\x08\x00" + b"\x00" * 20)
    code, _, err = run_cli(["convert", "--format", "coco", "--input", gz, "--out", tmp_path / "o"], capsys)
    assert code == 2 and error_line(err).endswith("decompress it first")


def test_wrong_format_flag(tmp_path, capsys):
    code, _, err = run_cli(["convert", "--format", "kitti", "--input", "x", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "invalid choice: 'kitti'" in err.strip().splitlines()[-1]
    # a GRIT jsonl given to --format vg: read, found not to be VG's layout
    rows = tmp_path / "grit.jsonl"
    rows.write_text(
        json.dumps({"caption": "a dog", "noun_chunks": []}) + "\n" + json.dumps({"caption": "x"}) + "\n"
    )
    code, _, err = run_cli(["convert", "--format", "vg", "--input", rows, "--out", tmp_path / "o"], capsys)
    line = error_line(err)
    assert code == 1 and line.startswith(f"cloc-data: error: {rows}") and "check that --format vg" in line
    # a pickle given to --format coco
    pkl = tmp_path / "refs(unc).p"
    pkl.write_bytes(pickle.dumps([{"ref_id": 1}], protocol=2))
    code, _, err = run_cli(["convert", "--format", "coco", "--input", pkl, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "is a pickle, but --format coco reads" in error_line(err)


def test_unreadable_encodings(tmp_path, capsys):
    latin1 = tmp_path / "instances_latin1.json"
    latin1.write_bytes(json.dumps({"images": [], "annotations": [], "categories": [{"name": "caf\u00e9"}]},
                                  ensure_ascii=False).encode("latin-1"))  # fmt: skip
    code, _, err = run_cli(
        ["convert", "--format", "coco", "--input", latin1, "--out", tmp_path / "o"], capsys
    )
    assert code == 1
    assert error_line(err).startswith(f"cloc-data: error: {latin1}: is not UTF-8 text (byte 0xe9 at position")
    utf16 = tmp_path / "instances_utf16.json"
    utf16.write_text('{"images": []}', encoding="utf-16")
    code, _, err = run_cli(["convert", "--format", "coco", "--input", utf16, "--out", tmp_path / "o"], capsys)
    assert code == 1 and "is UTF-16 text" in error_line(err)
    # a bad byte far into a JSON-lines file (past what is sniffed) is still traced to its file
    late = tmp_path / "rows" / "refcoco_jxu.jsonl"
    late.parent.mkdir()
    row = {"ref_id": 1, "ann_id": 1, "image_id": 1, "split": "val", "sentences": ["a man"], "bbox": [1, 1, 5, 5],
           "raw_image_info": json.dumps({"width": 40, "height": 30}), "image_path": "a.jpg"}  # fmt: skip
    lines = [json.dumps(dict(row, ref_id=i)) for i in range(100)]
    late.write_bytes(("\n".join(lines) + "\n").encode() + b'{"ref_id": "\xff"}\n')
    argv = [
        "convert",
        "--format",
        "refcoco",
        "--split",
        "val",
        "--input",
        late.parent,
        "--out",
        tmp_path / "o",
    ]
    code, _, err = run_cli([*argv, "--annotations-only"], capsys)
    assert code == 1 and error_line(err).startswith(f"cloc-data: error: {late}: is not UTF-8 text")


def test_empty_folder_and_empty_file(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "00000_stats.json").write_text("{}")  # a side file is not data
    code, _, err = run_cli(["convert", "--format", "grit", "--input", empty, "--out", tmp_path / "o"], capsys)
    assert code == 2 and error_line(err).startswith(f"cloc-data: error: {empty}: holds no GRIT data")
    code, _, err = run_cli(["stats", empty], capsys)
    assert code == 2 and error_line(err).startswith(f"cloc-data: error: {empty}: holds no .tar shards")
    zero = tmp_path / "instances.json"
    zero.write_bytes(b"")
    code, _, err = run_cli(["convert", "--format", "coco", "--input", zero, "--out", tmp_path / "o"], capsys)
    assert code == 1 and error_line(err) == f"cloc-data: error: {zero}: is empty (0 bytes): " + (
        "the download or copy is incomplete; fetch it again"
    )


def test_refused_pickle(tmp_path, capsys):
    folder = refer_folder(tmp_path)
    (folder / "refs(unc).p").write_bytes(
        b"\x80\x02cos\nsystem\nq\x00X\x05\x00\x00\x00echo!q\x01\x85q\x02Rq\x03."
    )
    argv = ["convert", "--format", "refcoco", "--split", "train", "--input", folder, "--out", tmp_path / "o"]
    code, _, err = run_cli(argv, capsys)
    line = error_line(err)
    assert code == 1 and line.startswith(f"cloc-data: error: {folder / 'refs(unc).p'}: refused to unpickle")
    assert "os.system" in line and "download it again" in line
    (folder / "refs(unc).p").write_bytes(b"\x80\x02]q\x00(}q\x01")  # truncated
    code, _, err = run_cli(argv, capsys)
    assert code == 1 and "not a readable pickle" in error_line(err)


def test_no_samples_is_an_error_not_a_silent_success(tmp_path, capsys):
    instances = tmp_path / "instances.json"
    instances.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "width": 10, "height": 10}],
                                     "annotations": [], "categories": []}))  # fmt: skip
    code, out, err = run_cli(
        ["convert", "--format", "coco", "--input", instances, "--out", tmp_path / "o"], capsys
    )
    assert code == 1 and "wrote 0 samples" in out
    assert error_line(err).startswith(f"cloc-data: error: {instances}: no samples written")
    assert json.loads((tmp_path / "o" / "conversion_report.json").read_text())["samples"] == 0


def test_flag_paths_and_split_errors(tmp_path, capsys):
    folder = refer_folder(tmp_path)
    base = ["convert", "--format", "refcoco", "--input", folder, "--out", tmp_path / "o"]
    code, _, err = run_cli([*base, "--split", "train", "--images", tmp_path / "no_images"], capsys)
    assert code == 2 and "--images must name an existing folder" in error_line(err)
    code, _, err = run_cli(base, capsys)  # no --split: argparse's usage line, then the error
    assert code == 2 and "--format refcoco needs --split" in err.strip().splitlines()[-1]
    code, _, err = run_cli([*base, "--split", "testa"], capsys)
    assert code == 2 and "is not a refcoco split" in err.strip().splitlines()[-1]
    code, _, err = run_cli(["stats", tmp_path / "missing"], capsys)
    assert code == 2 and error_line(err).startswith("cloc-data: error: ")


def test_subprocess_exit_status_and_single_line(tmp_path):
    shard = write_tar(tmp_path / "00000.tar", {"000000000.jpg": jpeg(), "000000000.json": b"{}"})
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    argv = [sys.executable, "-m", "cloc_data.cli", "convert", "--format", "vg", "--input", str(shard), "--out",
            str(tmp_path / "o")]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"cloc-data: error: {shard}: is a tar archive, but --format vg reads Visual Genome's "
        "region_descriptions.json; webdataset tars from img2dataset are GRIT's download layout (--format grit), "
        "and shards written by cloc-data are already converted (cloc-data stats reads them)"
    ]


# --- RefCOCO: evaluation splits never reach training by default ---------------------------------------


def test_refcoco_split_all_warns_and_training_refuses_eval_splits(tmp_path, capsys):
    folder = refer_folder(tmp_path)
    images = tmp_path / "train2014"
    out_all = tmp_path / "rc_all"
    argv = ["convert", "--format", "refcoco", "--input", folder, "--images", images, "--split", "all"]
    code, _, err = run_cli([*argv, "--out", out_all], capsys)
    assert code == 0 and "cloc-data: warning: --split all keeps RefCOCO's val/testA/testB/test" in err
    splits = {s.key: s.meta["split"] for s in iter_shard_samples(out_all, decode_images=False)}
    assert splits == {"ref_0": "train", "ref_1": "testA"}
    with pytest.raises(ValueError) as refused:
        RegionTextDataset.from_shards(out_all)
    message = str(refused.value)
    assert message.startswith(str(out_all / "shard-000000.tar")) and "'testA' split" in message
    assert "allow_eval_splits" in message
    assert len(RegionTextDataset.from_shards(out_all, allow_eval_splits=True)) == 2
    with pytest.raises(ValueError, match=r"shard-000000\.tar: sample 'ref_1' .* 'testA' split"):
        list(StreamingRegionTextDataset(out_all, shuffle_buffer=1))
    assert len(list(StreamingRegionTextDataset(out_all, shuffle_buffer=1, allow_eval_splits=True))) == 2

    out_train = tmp_path / "rc_train"
    code, _, err = run_cli([*argv[:-1], "train", "--out", out_train], capsys)
    assert code == 0 and "warning" not in err
    (train,) = RegionTextDataset.from_shards(out_train).samples
    assert train.key == "ref_0" and train.meta["split"] == "train"

    out_image = tmp_path / "rc_image"
    code, _, _ = run_cli([*argv, "--per", "image", "--out", out_image], capsys)
    assert code == 0
    per_image = {s.key: s.meta["split"] for s in iter_shard_samples(out_image, decode_images=False)}
    assert per_image == {"1": "train", "2": "testA"}  # per-image samples record their refs' split too
    with pytest.raises(ValueError, match="'testA' split"):
        RegionTextDataset.from_shards(out_image)


def lmms_rows(n, start=0):
    return [
        {"question_id": str(start + i), "image": {"bytes": jpeg(), "path": None}, "question": "prompt",
         "answer": [f"thing {start + i}"], "segmentation": [], "bbox": [1.0, 1.0, 5.0, 5.0], "iscrowd": 0,
         "file_name": f"COCO_train2014_{start + i:012d}.jpg"}
        for i in range(n)
    ]  # fmt: skip


def test_refcoco_hub_files_take_their_split_from_the_name(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "RefCOCO" / "data"
    data.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(lmms_rows(2)), data / "val-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(lmms_rows(3, 10)), data / "testA-00000-of-00001.parquet")
    out = tmp_path / "val"
    code, _, _ = run_cli(
        ["convert", "--format", "refcoco", "--split", "val", "--input", data, "--out", out], capsys
    )
    assert code == 0
    assert sorted(s.meta["split"] for s in iter_shard_samples(out, decode_images=False)) == ["val", "val"]

    out_all = tmp_path / "all"
    code, _, _ = run_cli(["convert", "--format", "refcoco", "--split", "all", "--input", data, "--out", out_all],
                         capsys)  # fmt: skip
    assert code == 0
    got = sorted(s.meta["split"] for s in iter_shard_samples(out_all, decode_images=False))
    assert got == ["testA"] * 3 + ["val"] * 2

    # a file named as testA cannot be converted as train (its rows would pass as training data)
    testa = data / "testA-00000-of-00001.parquet"
    argv = ["convert", "--format", "refcoco", "--input", testa, "--out", tmp_path / "o"]
    code, _, err = run_cli([*argv, "--split", "train"], capsys)
    assert code == 2
    assert error_line(err).startswith(f"cloc-data: error: {testa}: the file name says split 'testA'")
    # a renamed file: the rows do not say their split, so it must be given
    renamed = tmp_path / "refcoco_rows.parquet"
    renamed.write_bytes(testa.read_bytes())
    code, _, err = run_cli(["convert", "--format", "refcoco", "--input", renamed, "--out", tmp_path / "o2",
                            "--split", "all"], capsys)  # fmt: skip
    assert code == 2 and "pass --split val|testA|testB|test" in error_line(err)
    code, _, _ = run_cli(["convert", "--format", "refcoco", "--input", renamed, "--out", tmp_path / "o3",
                          "--split", "testA"], capsys)  # fmt: skip
    assert code == 0
