"""Shard writer/readers: round trip, atomicity, skip-and-count of malformed samples, HF datasets path."""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile

import pytest
from PIL import Image

from cloc_data.format import MalformedSample, Region, RegionSample
from cloc_data.hf_datasets import hf_record_to_sample, load_hf_dataset
from cloc_data.shards import (
    ShardWriter,
    SkipCounter,
    detect_image_extension,
    iter_shard_samples,
    list_shards,
)


def make_sample(i: int, with_image: bool = True, size: tuple[int, int] = (24, 16)) -> RegionSample:
    w, h = size
    sample = RegionSample(
        key=f"{i:09d}",
        caption=f"caption {i} with ünïcode",
        width=w,
        height=h,
        regions=[
            Region((1.0, 2.0, 10.5, 12.25), "a red thing", score=0.123456789012345, source="owlv2"),
            Region((0.0, 0.0, float(w), float(h)), "everything", source="human", meta={"ann_id": i}),
        ],
        meta={"dataset": "synthetic", "index": i, **({"only_sometimes": [1, 2]} if i % 3 == 2 else {})},
    )
    if with_image:
        sample.image = Image.new("RGB", size, (10 * i % 255, 100, 200))
    return sample


def write_tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def rounded(obj, places: int = 9):
    """``obj`` with every float rounded (for readers that store JSON floats with limited precision)."""
    if isinstance(obj, float):
        return round(obj, places)
    if isinstance(obj, dict):
        return {k: rounded(v, places) for k, v in obj.items()}
    if isinstance(obj, list):
        return [rounded(v, places) for v in obj]
    return obj


def png_bytes(size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def test_round_trip_identical_json_and_pixels(tmp_path):
    samples = [make_sample(i) for i in range(5)]
    with ShardWriter(tmp_path, max_samples_per_shard=2) as writer:
        for s in samples:
            writer.write(s)
    paths = writer.close()
    assert [os.path.basename(p) for p in paths] == [
        "shard-000000.tar",
        "shard-000001.tar",
        "shard-000002.tar",
    ]
    assert list_shards(tmp_path) == paths
    skipped = SkipCounter()
    got = list(iter_shard_samples(paths, skipped=skipped))
    assert skipped.total == 0
    assert [g.to_json() for g in got] == [s.to_json() for s in samples]
    for g, s in zip(got, samples):
        assert g.image.mode == "RGB" and g.image.tobytes() == s.image.tobytes()
    # members follow the img2dataset layout
    with tarfile.open(paths[0]) as tar:
        assert tar.getnames() == [
            "000000000.png",
            "000000000.txt",
            "000000000.json",
            "000000001.png",
            "000000001.txt",
            "000000001.json",
        ]
        assert tar.extractfile("000000000.txt").read().decode() == samples[0].caption


def test_encoded_bytes_kept_as_is_with_detected_extension(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), (200, 10, 10)).save(buf, format="JPEG")
    jpeg = buf.getvalue()
    sample = make_sample(0, with_image=False)
    sample.image = jpeg
    with ShardWriter(tmp_path, prefix="x") as writer:
        writer.write(sample)
    (path,) = writer.shard_paths
    with tarfile.open(path) as tar:
        assert tar.extractfile("000000000.jpg").read() == jpeg
    (raw,) = iter_shard_samples(path, decode_images=False)
    assert raw.image == jpeg
    assert detect_image_extension(png_bytes()) == "png"
    assert detect_image_extension(b"not an image") is None


def test_writer_rejects_bad_keys_duplicates_and_size_mismatch(tmp_path):
    with ShardWriter(tmp_path) as writer:
        for bad in ("a.b", "dir/x", ""):
            s = make_sample(0)
            s.key = bad
            with pytest.raises(ValueError, match=repr(bad).replace(".", r"\.")):
                writer.write(s)
        writer.write(make_sample(1))
        with pytest.raises(ValueError, match="duplicate sample key '000000001'"):
            writer.write(make_sample(1))
        wrong = make_sample(2)
        wrong.image = Image.new("RGB", (5, 5))
        with pytest.raises(MalformedSample, match="5x5"):
            writer.write(wrong)
        flipped = make_sample(3)
        flipped.regions[0].box = (10.0, 2.0, 1.0, 12.0)
        with pytest.raises(MalformedSample, match="region 0"):
            writer.write(flipped)
    assert [s.key for s in iter_shard_samples(tmp_path)] == ["000000001"]


def test_crashed_writer_leaves_no_listed_partial_shard(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(tmp_path, max_samples_per_shard=2) as writer:
            for i in range(3):
                writer.write(make_sample(i))
            raise RuntimeError("boom")
    # the first (full) shard is finished; the one in progress is discarded
    assert [os.path.basename(p) for p in list_shards(tmp_path)] == ["shard-000000.tar"]
    assert not list(tmp_path.glob("*.tmp"))


def test_killed_writer_temp_file_is_never_listed(tmp_path):
    writer = ShardWriter(tmp_path)
    writer.write(make_sample(0))  # process "dies" here: no close, no abort
    assert list(tmp_path.glob("*.tar.tmp"))
    assert list_shards(tmp_path) == []
    assert list_shards(str(tmp_path / "*")) == []
    writer.abort()


def test_list_shards_inputs(tmp_path):
    for name in ("b-000001.tar", "a-000000.tar", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [os.path.basename(p) for p in list_shards(tmp_path)] == ["a-000000.tar", "b-000001.tar"]
    assert list_shards(str(tmp_path / "b-*.tar")) == [str(tmp_path / "b-000001.tar")]
    assert list_shards([tmp_path / "b-000001.tar", str(tmp_path / "a-*")]) == sorted(
        [str(tmp_path / "a-000000.tar"), str(tmp_path / "b-000001.tar")]
    )
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_shards(tmp_path / "nowhere")


def test_malformed_samples_are_skipped_and_counted(tmp_path, caplog):
    good = make_sample(0, with_image=False, size=(8, 6)).to_json()
    flipped = dict(good, key="flipped", regions=[{"box": [5, 5, 1, 1], "phrase": "x"}])
    wrong_size = dict(good, key="wrongsize", width=100)
    members = [
        ("good.png", png_bytes()),
        ("good.json", json.dumps(dict(good, key="good")).encode()),
        ("badjson.png", png_bytes()),
        ("badjson.json", b"{not json"),
        ("noimage.json", json.dumps(dict(good, key="noimage")).encode()),
        ("nojson.png", png_bytes()),
        ("flipped.png", png_bytes()),
        ("flipped.json", json.dumps(flipped).encode()),
        ("corrupt.png", b"\x89PNG\r\n\x1a\n garbage"),
        ("corrupt.json", json.dumps(dict(good, key="corrupt")).encode()),
        ("wrongsize.png", png_bytes()),
        ("wrongsize.json", json.dumps(wrong_size).encode()),
        ("good2.jpeg", png_bytes()),  # extension lies about the format; PIL still decodes it
        ("good2.json", json.dumps(dict(good, key="good2")).encode()),
    ]
    path = tmp_path / "shard-000000.tar"
    write_tar(path, members)
    skipped = SkipCounter()
    with caplog.at_level(logging.WARNING, logger="cloc_data.shards"):
        got = list(iter_shard_samples([path], skipped=skipped))
    assert [s.key for s in got] == ["good", "good2"]
    assert skipped.as_dict() == {
        "bad_image": 1,
        "bad_json": 1,
        "invalid_sample": 1,
        "missing_image": 1,
        "missing_json": 1,
        "size_mismatch": 1,
    }
    assert skipped.total == 6
    assert "missing_image: 1 (e.g. noimage)" in skipped.report()
    assert "'badjson'" in caplog.text and "bad_json" in caplog.text
    # annotation-only reading keeps the sample without an image
    keys = [s.key for s in iter_shard_samples([path], require_image=False, skipped=SkipCounter())]
    assert "noimage" in keys


def test_truncated_shard_yields_what_it_can(tmp_path):
    with ShardWriter(tmp_path) as writer:
        for i in range(4):
            writer.write(make_sample(i))
    (path,) = writer.shard_paths
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    skipped = SkipCounter()
    got = list(iter_shard_samples(path, skipped=skipped))
    assert 1 <= len(got) < 4
    assert skipped.counts["bad_shard"] == 1 or skipped.total >= 1


def test_annotation_only_shard(tmp_path):
    with ShardWriter(tmp_path) as writer:
        writer.write(make_sample(7, with_image=False))
    with tarfile.open(writer.shard_paths[0]) as tar:
        assert tar.getnames() == ["000000007.txt", "000000007.json"]
    skipped = SkipCounter()
    assert list(iter_shard_samples(tmp_path, skipped=skipped)) == []
    assert skipped.as_dict() == {"missing_image": 1}
    (s,) = iter_shard_samples(tmp_path, require_image=False)
    assert s.image is None and s.to_json() == make_sample(7).to_json()


def test_skip_counter_merge_and_log_cap(caplog):
    a = SkipCounter("rows", max_logged_per_reason=1)
    with caplog.at_level(logging.WARNING, logger="cloc_data.shards"):
        for k in ("k1", "k2", "k3"):
            a.skip("bad", k)
    assert "'k1'" in caplog.text and "'k3'" not in caplog.text and "no longer logged" in caplog.text
    b = SkipCounter("rows")
    b.skip("other", "z")
    a.merge(b)
    assert a.as_dict() == {"bad": 3, "other": 1} and a.total == 4
    assert a.report().startswith("skipped 4 rows:")
    assert SkipCounter("rows").report() == "skipped 0 rows"


@pytest.mark.parametrize("streaming", [True, False])
def test_hf_datasets_reader(tmp_path, monkeypatch, streaming):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    samples = [make_sample(i) for i in range(4)]
    shard_dir = tmp_path / "shards"
    with ShardWriter(shard_dir, max_samples_per_shard=3) as writer:
        for s in samples:
            writer.write(s)
    ds = load_hf_dataset(shard_dir, streaming=streaming, cache_dir=str(tmp_path / "cache"))
    got = [hf_record_to_sample(row) for row in ds]
    # meta keys that appear only in later samples survive (explicit Json feature, no inferred schema);
    # datasets stores JSON with 10 decimal places, so compare floats to 1e-9
    assert [rounded(g.to_json()) for g in got] == [rounded(s.to_json()) for s in samples]
    for g, s in zip(got, samples):
        assert g.image.mode == "RGB" and g.image.tobytes() == s.image.tobytes()


def test_hf_record_to_sample_errors():
    good = make_sample(1, with_image=False, size=(8, 6)).to_json()
    with pytest.raises(MalformedSample, match="no json"):
        hf_record_to_sample({"__key__": "k"})
    with pytest.raises(MalformedSample, match="no image"):
        hf_record_to_sample({"__key__": "k", "json": good})
    s = hf_record_to_sample(
        {"__key__": "k", "json": json.dumps(good), "png": {"bytes": png_bytes(), "path": None}}
    )
    assert s.image.size == (8, 6)
    with pytest.raises(MalformedSample, match="16"):
        hf_record_to_sample({"__key__": "k", "json": dict(good, height=16), "png": png_bytes()})
