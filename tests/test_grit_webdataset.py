"""GRIT as its users have it: img2dataset's webdataset output and the hub's parquet rows.

The fixtures are written from the published descriptions, not from this project's code:

* img2dataset ``--output_format webdataset``: ``NNNNN.tar`` shards whose samples are ``KEY.jpg``
  (the downloaded image, resized by ``--resize_mode``), ``KEY.txt`` (the caption) and ``KEY.json``
  (``url``, ``caption``, ``key``, ``status``, ``error_message``, ``width``/``height`` of the stored
  image, ``original_width``/``original_height``, ``exif``, ``sha256``, plus the columns listed in
  ``--save_additional_columns``), with ``NNNNN.parquet`` and ``NNNNN_stats.json`` beside each tar.
  ``keep_ratio`` makes the smaller side ``image_size``; ``center_crop`` crops a square.
* GRIT rows (``zzliang/GRIT``): ``key, id, url, caption, width, height, clip_similarity_vitb32,
  clip_similarity_vitl14, noun_chunks, ref_exps``; the last two are lists of
  ``[char_start, char_end, x1, y1, x2, y2, score]`` with corners normalised to the original image.
"""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from PIL import Image

from cloc_data.cli import main as cli_main
from cloc_data.converters import iter_grit
from cloc_data.shards import SkipCounter, iter_shard_samples

CAPTION = "a dog on a red sofa"
NOUN_CHUNKS = [[0.0, 5.0, 0.1, 0.2, 0.5, 0.6, 0.9], [9.0, 19.0, 0.0, 0.5, 1.0, 1.0, 0.7]]
REF_EXPS = [[0.0, 19.0, 0.0, 0.1, 1.0, 1.0, 0.8]]


def jpeg(size, color=(200, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def keep_ratio(original, image_size=256):
    """img2dataset's keep_ratio: the smaller side becomes image_size, the aspect ratio stays."""
    w, h = original
    scale = image_size / min(w, h)
    return int(round(w * scale)), int(round(h * scale))


def img2dataset_json(key, original, stored, status="success", **extra):
    meta = {
        "url": f"https://example.com/{key}.jpg",
        "caption": CAPTION,
        "key": key,
        "status": status,
        "error_message": None if status == "success" else "HTTP Error 404: Not Found",
        "width": stored[0] if stored else None,
        "height": stored[1] if stored else None,
        "original_width": original[0] if stored else None,
        "original_height": original[1] if stored else None,
        "exif": None,
        "sha256": "0" * 64 if stored else None,
        # --save_additional_columns '["id","noun_chunks","ref_exps","clip_similarity_vitb32","clip_similarity_vitl14"]'
        "id": int(key),
        "noun_chunks": NOUN_CHUNKS,
        "ref_exps": REF_EXPS,
        "clip_similarity_vitb32": 0.31,
        "clip_similarity_vitl14": 0.29,
    }
    meta.update(extra)
    return meta


def add_member(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shard(folder, shard_id, samples):
    """One img2dataset shard: the tar plus the parquet and stats files it writes beside it.

    ``samples``: ``(key, json dict or raw bytes, image bytes or None)``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{shard_id:05d}.tar"
    with tarfile.open(path, "w") as tar:
        for key, meta, image in samples:
            if image is not None:
                add_member(tar, f"{key}.jpg", image)
            if isinstance(meta, dict):
                add_member(tar, f"{key}.txt", str(meta.get("caption", CAPTION)).encode())
                add_member(tar, f"{key}.json", json.dumps(meta, indent=4).encode())
            else:
                add_member(tar, f"{key}.json", meta)
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {k: json.dumps(v) if isinstance(v, list) else v for k, v in m.items()}
        for _, m, _ in samples
        if isinstance(m, dict)
    ]
    pq.write_table(pa.Table.from_pylist(rows), folder / f"{shard_id:05d}.parquet")
    (folder / f"{shard_id:05d}_stats.json").write_text(json.dumps({"count": len(samples), "successes": 1}))
    return path


def grit_download(tmp_path):
    """Two shards: resized images, a failed download, a malformed row, a centre-cropped image."""
    folder = tmp_path / "grit_wds"
    a_orig, b_orig = (640, 480), (300, 500)
    a_size, b_size = keep_ratio(a_orig), keep_ratio(b_orig)  # (341, 256), (256, 427)
    write_shard(folder, 0, [
        ("000000000", img2dataset_json("000000000", a_orig, a_size), jpeg(a_size)),
        ("000000001", img2dataset_json("000000001", None, None, status="failed_to_download"), None),
        ("000000002", b'{"caption": "a cat", "noun_chunks": [[0, 5, 0.1,', jpeg((64, 64))),  # truncated json
    ])  # fmt: skip
    write_shard(folder, 1, [
        ("000010000", img2dataset_json("000010000", b_orig, b_size), jpeg(b_size, (10, 200, 10))),
        # --resize_mode center_crop: a square, so the normalised boxes of the original do not apply
        ("000010001", img2dataset_json("000010001", a_orig, (256, 256)), jpeg((256, 256))),
    ])  # fmt: skip
    return folder, a_size, b_size


def rounded(sample):
    return [tuple(round(v, 4) for v in r.box) for r in sample.regions]


def test_webdataset_folder_boxes_follow_the_stored_image(tmp_path):
    folder, a_size, b_size = grit_download(tmp_path)
    skipped = SkipCounter()
    got = {s.key: s for s in iter_grit(folder, skipped)}
    assert sorted(got) == ["000000000", "000010000"]
    a = got["000000000"]
    assert (a.width, a.height) == a_size == (341, 256)  # the stored (resized) image, not the original
    w, h = a_size
    assert rounded(a) == [
        (round(0.1 * w, 4), round(0.2 * h, 4), round(0.5 * w, 4), round(0.6 * h, 4)),
        (0.0, round(0.5 * h, 4), float(w), float(h)),
    ]
    assert [r.phrase for r in a.regions] == ["a dog", "a red sofa"]
    assert a.meta["original_width"] == 640 and a.meta["original_height"] == 480 and a.meta["id"] == 0
    assert "image_path" not in a.meta and isinstance(a.image, bytes)
    b = got["000010000"]
    assert (b.width, b.height) == b_size == (256, 427) and rounded(b)[1] == (0.0, 213.5, 256.0, 427.0)
    # the .parquet / _stats.json files beside the tars are metadata, not read a second time
    assert skipped.as_dict() == {"aspect_changed": 1, "bad_json": 1, "failed_download": 1}


def test_cli_converts_a_folder_and_a_single_tar(tmp_path, capsys):
    folder, a_size, _ = grit_download(tmp_path)
    out = tmp_path / "out"
    assert cli_main(["convert", "--format", "grit", "--input", str(folder), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wrote 2 samples (2 with images" in printed
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["samples"] == 2 and report["regions"] == 4
    assert report["skipped"] == {"aspect_changed": 1, "bad_json": 1, "failed_download": 1}
    samples = {s.key: s for s in iter_shard_samples(out, decode_images=False)}
    with tarfile.open(folder / "00000.tar") as tar:
        original_bytes = tar.extractfile("000000000.jpg").read()
    assert samples["000000000"].image == original_bytes  # the JPEG is carried, not re-encoded
    decoded = next(s for s in iter_shard_samples(out) if s.key == "000000000")
    assert decoded.image.size == a_size

    out1 = tmp_path / "out_one"
    argv = ["convert", "--format", "grit", "--input", str(folder / "00001.tar"), "--out", str(out1)]
    assert cli_main([*argv, "--grit-phrases", "both"]) == 0
    capsys.readouterr()
    (only,) = iter_shard_samples(out1)
    assert only.key == "000010000" and [r.meta["kind"] for r in only.regions] == ["noun_chunk"] * 2 + [
        "ref_exp"
    ]


def test_missing_image_and_caption_from_txt(tmp_path):
    folder = tmp_path / "wds"
    meta = img2dataset_json("000000005", (100, 100), (100, 100))
    no_caption = dict(img2dataset_json("000000006", (100, 100), (100, 100)))
    del no_caption["caption"]
    write_shard(folder, 0, [("000000005", meta, None), ("000000006", no_caption, jpeg((100, 100)))])
    skipped = SkipCounter()
    (sample,) = iter_grit(folder / "00000.tar", skipped)
    assert sample.key == "000000006" and sample.caption == CAPTION  # from KEY.txt
    assert skipped.counts["missing_image"] == 1


def test_parquet_rows_annotation_only_and_embedded_images(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"key": "000000100", "clip_similarity_vitb32": 0.3, "clip_similarity_vitl14": 0.2, "id": 7,
         "url": "https://example.com/a.jpg", "caption": CAPTION, "width": 640, "height": 480,
         "noun_chunks": NOUN_CHUNKS, "ref_exps": REF_EXPS},
        {"key": "000000101", "clip_similarity_vitb32": 0.3, "clip_similarity_vitl14": 0.2, "id": 8,
         "url": "https://example.com/b.jpg", "caption": CAPTION, "width": 640, "height": 480,
         "noun_chunks": [[0.0, 99.0, 0.1, 0.1, 0.2, 0.2, 0.5]], "ref_exps": []},  # span outside the caption
    ]  # fmt: skip
    grit = tmp_path / "grit-20m"
    grit.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), grit / "coyo_0_snappy.parquet")
    out = tmp_path / "ann"
    argv = ["convert", "--format", "grit", "--input", str(grit), "--out", str(out), "--annotations-only"]
    assert cli_main(argv) == 0
    capsys.readouterr()
    (sample,) = iter_shard_samples(out, require_image=False)
    assert (sample.width, sample.height) == (640, 480) and rounded(sample)[0] == (64.0, 96.0, 320.0, 288.0)
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["skipped"] == {"no_regions": 1, "region_bad_entry": 1}

    # a copy with the image embedded (an "image" column of {"bytes", "path"}), stored resized
    embedded = [dict(rows[0], image={"bytes": jpeg((320, 240)), "path": None})]
    pq.write_table(pa.Table.from_pylist(embedded), tmp_path / "with_images.parquet")
    (with_image,) = iter_grit(tmp_path / "with_images.parquet", SkipCounter())
    assert (with_image.width, with_image.height) == (320, 240) and rounded(with_image)[0] == (
        32.0,
        48.0,
        160.0,
        144.0,
    )


def test_truncated_tar_keeps_samples_before_the_damage(tmp_path):
    folder, a_size, _ = grit_download(tmp_path)
    with tarfile.open(folder / "00001.tar") as tar:
        cut = tar.getmember("000010001.jpg").offset_data + 50  # inside the second sample's image
    damaged = tmp_path / "damaged.tar"
    damaged.write_bytes((folder / "00001.tar").read_bytes()[:cut])
    skipped = SkipCounter()
    assert [s.key for s in iter_grit(damaged, skipped)] == ["000010000"]
    assert skipped.as_dict() == {"bad_shard": 1}


def test_only_failed_downloads_is_an_error(tmp_path, capsys):
    folder = tmp_path / "failed"
    write_shard(folder, 0, [
        (f"00000000{i}", img2dataset_json(f"00000000{i}", None, None, status="failed_to_download"), None)
        for i in range(2)
    ])  # fmt: skip
    assert (
        cli_main(["convert", "--format", "grit", "--input", str(folder), "--out", str(tmp_path / "o")]) == 1
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"cloc-data: error: {folder}: no samples") and "failed_download 2" in err


@pytest.mark.parametrize("phrases", ["noun_chunks", "ref_exps"])
def test_phrase_lists_from_tars(tmp_path, phrases):
    folder, _, _ = grit_download(tmp_path)
    got = list(iter_grit(folder, SkipCounter(), phrases=phrases))
    kinds = {r.meta["kind"] for s in got for r in s.regions}
    assert kinds == {phrases[:-1]}
