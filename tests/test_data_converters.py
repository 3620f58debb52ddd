"""Dataset converters, the restricted unpickler and the ``cloc-data`` CLI, on tiny fixtures in the real formats."""

from __future__ import annotations

import io
import json
import os
import pickle

import pytest
from PIL import Image

from cloc_data.cli import main as cli_main
from cloc_data.converters import (
    SIZE_UNKNOWN,
    ImageResolver,
    iter_coco_instances,
    iter_flickr30k,
    iter_grit,
    iter_refcoco,
    iter_visual_genome,
    make_key,
    parse_sentence,
    resolve_size,
    xywh_to_xyxy,
)
from cloc_data.safe_pickle import ForbiddenGlobalError, load_pickle_file, safe_loads
from cloc_data.shards import SkipCounter, iter_shard_samples, list_shards


def boxes(sample):
    return [tuple(round(v, 6) for v in r.box) for r in sample.regions]


def write_json(path, data):
    path.write_text(json.dumps(data))
    return path


def write_image(path, size, fmt="PNG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 30, 200)).save(path, format=fmt)
    return path


def image_bytes(size, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (5, 6, 7)).save(buf, format=fmt)
    return buf.getvalue()


# --- common -----------------------------------------------------------------------------------------


def test_make_key_and_xywh():
    assert make_key("ref", 12) == "ref_12"
    assert make_key("COCO_train2014.jpg") == "COCO_train2014_jpg"
    with pytest.raises(ValueError):
        make_key(None, "")
    assert xywh_to_xyxy([[10, 20, 30, 40]]) == [(10.0, 20.0, 40.0, 60.0)]
    with pytest.raises(ValueError, match="4 numbers"):
        xywh_to_xyxy([[1, 2, 3]])


def test_image_resolver(tmp_path):
    write_image(tmp_path / "VG_100K_2" / "7.jpg", (4, 4), "JPEG")
    write_image(tmp_path / "a.png", (4, 4))
    resolve = ImageResolver(tmp_path)
    assert resolve("VG_100K_2/7.jpg") == tmp_path / "VG_100K_2" / "7.jpg"
    assert resolve("VG_100K/7.jpg") == tmp_path / "VG_100K_2" / "7.jpg"  # other sub-folder, same name
    assert resolve("7.jpg") == tmp_path / "VG_100K_2" / "7.jpg"
    assert resolve("../a.png") == tmp_path / "a.png"  # never escapes the root
    assert resolve("missing.jpg") is None and resolve(None) is None


# --- safe pickle ------------------------------------------------------------------------------------


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_safe_pickle_rejects_globals():
    with pytest.raises(ForbiddenGlobalError, match="forbidden global .*system"):
        safe_loads(pickle.dumps([{"ref_id": 1, "x": _Evil()}], protocol=2))
    with pytest.raises(ForbiddenGlobalError, match="builtins.eval"):
        safe_loads(pickle.dumps(eval))
    with pytest.raises(ForbiddenGlobalError, match="collections.OrderedDict"):
        from collections import OrderedDict

        safe_loads(pickle.dumps(OrderedDict(a=1)))


def test_safe_pickle_loads_plain_data_all_protocols():
    refs = [
        {
            "ref_id": 1,
            "sentences": [{"sent": "left man", "tokens": ["left", "man"]}],
            "split": "val",
            "w": 1.5,
        },
        {
            "ref_id": 2,
            "ids": (1, 2),
            "flags": {3, 4},
            "frozen": frozenset([5]),
            "raw": b"\x00\xff",
            "n": None,
        },
    ]
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        assert safe_loads(pickle.dumps(refs, protocol=protocol)) == refs


def test_safe_pickle_python2_protocol2(tmp_path):
    # what Python 2 writes for [{'split': 'val', 'ref_id': 7, 'sent_ids': set([1])}] with protocol 2:
    # py2 str is SHORT_BINSTRING ('U'), set is __builtin__.set
    data = (
        b"\x80\x02]q\x00}q\x01(U\x05splitq\x02U\x03valq\x03U\x06ref_idq\x04K\x07"
        b"U\x08sent_idsq\x05c__builtin__\nset\nq\x06]q\x07K\x01a\x85q\x08Rq\tua."
    )
    path = tmp_path / "refs(unc).p"
    path.write_bytes(data)
    assert load_pickle_file(path) == [{"split": "val", "ref_id": 7, "sent_ids": {1}}]
    path.write_bytes(b"\x80\x02cposix\nsystem\nq\x00.")
    with pytest.raises(ForbiddenGlobalError, match=r"refs\(unc\)\.p: refused to unpickle \(forbidden global posix\.system"):
        load_pickle_file(path)
    path.write_bytes(b"garbage")
    with pytest.raises(pickle.UnpicklingError, match="not a readable pickle"):
        load_pickle_file(path)


# --- GRIT -------------------------------------------------------------------------------------------


GRIT_ROW = {
    "key": "000010002",
    "id": 42,
    "url": "https://example.com/dog.jpg",
    "caption": "a dog on a red sofa",
    "width": 200,
    "height": 100,
    "clip_similarity_vitb32": 0.31,
    "noun_chunks": [[0, 5, 0.1, 0.2, 0.5, 0.6, 0.9], [9, 19, 0.0, 0.5, 1.0, 1.0, 0.7]],
    "ref_exps": [[0, 19, 0.0, 0.1, 1.0, 1.0, 0.8]],
}


def grit_rows():
    return [
        GRIT_ROW,
        dict(
            GRIT_ROW,
            key="000010003",
            noun_chunks=[[0, 40, 0.1, 0.1, 0.2, 0.2, 0.5], [0, 5, 5, 5, 90, 90, 0.5]],
        ),
        {"key": "000010004", "width": 10, "height": 10, "noun_chunks": []},  # no caption
        dict(GRIT_ROW, key="000010005", noun_chunks=[[0, 5, 0.5, 0.5, 0.5, 0.9, 0.9]]),  # zero width
        dict(GRIT_ROW, key="000010006", noun_chunks="oops"),
    ]


def check_grit(samples, skipped):
    (s,) = samples
    assert s.key == "000010002" and s.caption == "a dog on a red sofa"
    assert [r.phrase for r in s.regions] == ["a dog", "a red sofa"]
    assert boxes(s) == [(20.0, 20.0, 100.0, 60.0), (0.0, 50.0, 200.0, 100.0)]
    assert s.regions[0].score == 0.9 and s.regions[0].source == "grit"
    assert s.regions[0].meta == {"kind": "noun_chunk", "span": [0, 5]}
    assert s.meta["image_path"] == "00001/000010002.jpg" and s.meta["id"] == 42
    assert skipped["region_bad_entry"] == 3  # span out of caption, pixel coords, wrong type
    assert skipped["bad_record"] == 1 and skipped["region_invalid_box"] == 1
    assert skipped["no_regions"] == 3


def test_grit_jsonl_and_parquet(tmp_path):
    path = tmp_path / "grit.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in grit_rows()) + "\n{broken\n")
    skipped = SkipCounter()
    check_grit(list(iter_grit(path, skipped)), skipped.counts)
    assert skipped.counts["bad_row"] == 1

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [r for r in grit_rows() if isinstance(r.get("noun_chunks"), list) and "caption" in r]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "grit.parquet")
    skipped = SkipCounter()
    got = list(iter_grit(tmp_path / "grit.parquet", skipped, phrases="both"))
    assert [r.meta["kind"] for r in got[0].regions] == ["noun_chunk", "noun_chunk", "ref_exp"]
    assert got[0].regions[2].phrase == "a dog on a red sofa"
    skipped = SkipCounter()
    (low,) = iter_grit(tmp_path / "grit.parquet", skipped, min_score=0.8)
    assert [r.phrase for r in low.regions] == ["a dog"] and skipped.counts["region_low_score"] == 1


# --- Visual Genome ----------------------------------------------------------------------------------


def vg_files(tmp_path):
    regions = [
        {
            "id": 1,
            "regions": [
                {
                    "region_id": 11,
                    "image_id": 1,
                    "phrase": "a man",
                    "x": 10,
                    "y": 20,
                    "width": 30,
                    "height": 40,
                },
                {"region_id": 12, "image_id": 1, "phrase": "flat", "x": 5, "y": 5, "width": 0, "height": 10},
                {"region_id": 13, "image_id": 1, "phrase": "  ", "x": 5, "y": 5, "width": 5, "height": 10},
            ],
        },
        {"id": 2, "regions": [{"region_id": 21, "image_id": 2, "x": 1, "y": 1, "width": 5, "height": 5}]},
        {
            "id": 3,
            "regions": [
                {"region_id": 31, "image_id": 3, "phrase": "sky", "x": 0, "y": 0, "width": 50, "height": 9}
            ],
        },
        "not a dict",
    ]
    image_data = [
        {
            "image_id": 1,
            "width": 100,
            "height": 80,
            "url": "https://cs.stanford.edu/people/rak248/VG_100K_2/1.jpg",
        },
        {
            "image_id": 2,
            "width": 100,
            "height": 80,
            "url": "https://cs.stanford.edu/people/rak248/VG_100K/2.jpg",
        },
    ]
    return write_json(tmp_path / "region_descriptions.json", regions), write_json(
        tmp_path / "image_data.json", image_data
    )


def test_visual_genome(tmp_path):
    regions_path, image_data_path = vg_files(tmp_path)
    skipped = SkipCounter()
    got = list(iter_visual_genome(regions_path, skipped, image_data=image_data_path))
    assert [s.key for s in got] == ["1", "3"]
    one, three = got
    assert [r.phrase for r in one.regions] == ["a man"] and boxes(one) == [(10.0, 20.0, 40.0, 60.0)]
    assert one.regions[0].meta == {"region_id": 11} and one.regions[0].source == "human"
    assert (one.width, one.height, one.meta["image_path"]) == (100, 80, "VG_100K_2/1.jpg")
    # image 3 is not in image_data.json: size unknown until the image is read
    assert three.meta[SIZE_UNKNOWN] and (three.width, three.height) == (0, 0)
    assert three.meta["image_path"] == "3.jpg"
    resolved = resolve_size(three, (48, 9), SkipCounter())  # 50 px wide box in a 48 px image: clipped
    assert SIZE_UNKNOWN not in resolved.meta and boxes(resolved) == [(0.0, 0.0, 48.0, 9.0)]
    assert skipped.as_dict() == {
        "bad_record": 1,
        "no_regions": 1,
        "region_bad_entry": 1,
        "region_empty_phrase": 1,
        "region_invalid_box": 1,
    }
    # without image_data.json every size is unknown
    assert all(s.meta[SIZE_UNKNOWN] for s in iter_visual_genome(regions_path, SkipCounter()))


# --- RefCOCO ----------------------------------------------------------------------------------------


def refer_folder(tmp_path):
    folder = tmp_path / "refcoco"
    folder.mkdir()
    instances = {
        "images": [
            {"id": 100, "file_name": "COCO_train2014_000000000100.jpg", "width": 64, "height": 48},
            {"id": 200, "file_name": "COCO_train2014_000000000200.jpg", "width": 32, "height": 32},
        ],
        "annotations": [
            {"id": 1, "image_id": 100, "bbox": [4, 6, 20, 10], "category_id": 1},
            {"id": 2, "image_id": 100, "bbox": [30, 0, 10, 10], "category_id": 18},
            {"id": 3, "image_id": 200, "bbox": [5, 5, 0, 3], "category_id": 1},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}],
    }
    write_json(folder / "instances.json", instances)

    def sent(i, text):
        return {"sent_id": i, "sent": text, "raw": text.upper(), "tokens": text.split()}

    refs = [
        {"ref_id": 0, "ann_id": 1, "image_id": 100, "split": "val", "category_id": 1, "sent_ids": [0, 1],
         "file_name": "COCO_train2014_000000000100_1.jpg", "sentences": [sent(0, "man on left"), sent(1, "left guy")]},
        {"ref_id": 1, "ann_id": 2, "image_id": 100, "split": "val", "category_id": 18, "sent_ids": [2],
         "file_name": "COCO_train2014_000000000100_2.jpg", "sentences": [sent(2, "the dog")]},
        {"ref_id": 2, "ann_id": 2, "image_id": 100, "split": "testA", "category_id": 18, "sent_ids": [3],
         "file_name": "x.jpg", "sentences": [sent(3, "dog again")]},
        {"ref_id": 3, "ann_id": 99, "image_id": 100, "split": "val", "category_id": 1, "sent_ids": [4],
         "file_name": "x.jpg", "sentences": [sent(4, "ghost")]},
        {"ref_id": 4, "ann_id": 3, "image_id": 200, "split": "val", "category_id": 1, "sent_ids": [5],
         "file_name": "x.jpg", "sentences": [sent(5, "thin thing")]},
    ]  # fmt: skip
    (folder / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    return folder


def test_refcoco_refer_per_ref(tmp_path):
    folder = refer_folder(tmp_path)
    skipped = SkipCounter()
    got = list(iter_refcoco(folder, skipped, split="val"))
    assert [s.key for s in got] == ["ref_0", "ref_1"]
    first = got[0]
    assert [r.phrase for r in first.regions] == ["man on left", "left guy"]
    assert boxes(first) == [(4.0, 6.0, 24.0, 16.0)] * 2
    assert (first.width, first.height, first.caption) == (64, 48, "")
    assert {
        k: first.meta[k] for k in ("ref_id", "ann_id", "split", "category_id", "dataset", "image_path")
    } == {
        "ref_id": 0,
        "ann_id": 1,
        "split": "val",
        "category_id": 1,
        "dataset": "refcoco",
        "image_path": "COCO_train2014_000000000100.jpg",
    }
    assert [s["raw"] for s in first.meta["sentences"]] == ["MAN ON LEFT", "LEFT GUY"]
    assert first.regions[0].meta == {"sent_id": 0}
    assert skipped.as_dict() == {"bad_record": 1, "no_regions": 1, "region_invalid_box": 1}


def test_refcoco_refer_per_image_and_pickle_file(tmp_path):
    folder = refer_folder(tmp_path)
    skipped = SkipCounter()
    (image,) = iter_refcoco(folder / "refs(unc).p", skipped, per="image", split="val")
    assert image.key == "100" and [r.phrase for r in image.regions] == ["man on left", "left guy", "the dog"]
    assert image.regions[2].meta == {
        "ref_id": 1,
        "ann_id": 2,
        "split": "val",
        "category_id": 18,
        "sent_id": 2,
    }
    everything = list(iter_refcoco(folder, SkipCounter(), per="image"))
    assert len(everything[0].regions) == 4  # + the testA ref


def test_refcoco_hf_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    lmms = [
        {"question_id": "12_3", "image": {"bytes": image_bytes((40, 30)), "path": None}, "question": "prompt",
         "answer": ["woman in red", "red shirt"], "segmentation": [1.0, 2.0], "bbox": [2.0, 3.0, 10.0, 12.0],
         "iscrowd": 0, "file_name": "COCO_train2014_000000000012.jpg"},
        {"question_id": "13_1", "image": {"bytes": image_bytes((40, 30)), "path": None}, "question": "prompt",
         "answer": ["bad box"], "segmentation": [], "bbox": [1.0, 2.0, 3.0], "iscrowd": 0, "file_name": "x.jpg"},
    ]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(lmms), tmp_path / "val-00000-of-00001.parquet")
    skipped = SkipCounter()
    (row,) = iter_refcoco(tmp_path / "val-00000-of-00001.parquet", skipped, split="val")
    assert row.key == "q_12_3" and [r.phrase for r in row.regions] == ["woman in red", "red shirt"]
    assert row.meta[SIZE_UNKNOWN] and isinstance(row.image, bytes) and row.meta["split"] == "val"
    resolved = resolve_size(row, (40, 30), SkipCounter())
    assert boxes(resolved) == [(2.0, 3.0, 12.0, 15.0)] * 2
    assert skipped.as_dict() == {"bad_record": 1}

    jxu = [
        {"ref_id": 5, "ann_id": 9, "image_id": 12, "split": "testB", "category_id": 3, "sent_ids": [1],
         "sentences": [{"raw": "Car Left", "sent": "car left", "sent_id": 1, "tokens": ["car", "left"]}],
         "bbox": [0.0, 0.0, 1.0, 1.0], "raw_anns": json.dumps({"id": 9, "bbox": [5, 6, 7, 8]}),
         "raw_image_info": json.dumps({"id": 12, "width": 50, "height": 40, "file_name": "c.jpg"}),
         "image_path": "coco/train2014/COCO_train2014_000000000012.jpg"},
        {"ref_id": 6, "ann_id": 9, "image_id": 12, "split": "val", "sentences": "[\"old style\"]",
         "bbox": [5, 6, 7, 8], "raw_image_info": "{}", "image_path": "x.jpg"},
        {"something": "else"},
    ]  # fmt: skip
    path = tmp_path / "refcoco_jxu.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in jxu))
    skipped = SkipCounter()
    got = list(iter_refcoco(path, skipped))
    assert [s.key for s in got] == ["ref_5", "ref_6"]
    assert boxes(got[0]) == [(5.0, 6.0, 12.0, 14.0)] and got[0].regions[0].phrase == "car left"
    assert (got[0].width, got[0].height, got[0].meta["split"]) == (50, 40, "testB")
    assert got[1].meta[SIZE_UNKNOWN] and got[1].regions[0].phrase == "old style"
    assert skipped.as_dict() == {"bad_record": 1}
    assert [s.key for s in iter_refcoco(path, SkipCounter(), split="testB")] == ["ref_5"]
    with pytest.raises(ValueError, match="per ref only"):
        list(iter_refcoco(path, SkipCounter(), per="image"))


# --- Flickr30k Entities -----------------------------------------------------------------------------


def flickr_root(tmp_path):
    root = tmp_path / "flickr30k_entities"
    (root / "Sentences").mkdir(parents=True)
    (root / "Annotations").mkdir()
    (root / "Sentences" / "1000.txt").write_text(
        "[/EN#18/people Two young guys] are playing with [/EN#20/other a ball] in [/EN#21/scene the park] .\n"
        "[/EN#18/people Two young guys] look at [/EN#0/notvisual each other] and [/EN#22/other a cat] .\n"
        "[/EN#23/bodyparts/people A hand] holds [/EN#99/other nothing] .\n"
    )
    (root / "Annotations" / "1000.xml").write_text(
        "<annotation><filename>1000.jpg</filename>"
        "<size><width>100</width><height>80</height><depth>3</depth></size>"
        "<object><name>18</name><bndbox><xmin>11</xmin><ymin>21</ymin><xmax>30</xmax><ymax>40</ymax></bndbox></object>"
        "<object><name>18</name><name>23</name>"
        "<bndbox><xmin>51</xmin><ymin>11</ymin><xmax>70</xmax><ymax>60</ymax></bndbox></object>"
        "<object><name>20</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object>"
        "<object><name>21</name><nobndbox>1</nobndbox><scene>1</scene></object>"
        "<object><name>22</name><nobndbox>1</nobndbox><scene>0</scene></object>"
        "</annotation>"
    )
    (root / "Sentences" / "2000.txt").write_text("[/EN#1/people A man] .\n")
    (root / "Annotations" / "2000.xml").write_text("<annotation><size><width>10</width>")  # truncated
    (root / "test.txt").write_text("1000\n2000\n")
    return root


def test_flickr30k_sentence_parsing():
    s = parse_sentence("[/EN#18/people Two young guys] play with [/EN#20/clothing/other a ball] .")
    assert s.text == "Two young guys play with a ball ."
    assert [(p.text, p.entity_id, p.types) for p in s.phrases] == [
        ("Two young guys", "18", ["people"]),
        ("a ball", "20", ["clothing", "other"]),
    ]
    assert [s.text[a:b] for a, b in (p.span for p in s.phrases)] == ["Two young guys", "a ball"]


def test_flickr30k_union_per_image(tmp_path):
    root = flickr_root(tmp_path)
    skipped = SkipCounter()
    (sample,) = iter_flickr30k(root, skipped, split="test")
    assert sample.key == "1000" and sample.caption == "Two young guys are playing with a ball in the park ."
    assert [r.phrase for r in sample.regions] == ["Two young guys", "a ball", "A hand"]
    # entity 18 has two boxes -> their union; 1-based VOC corners -> (xmin - 1, ymin - 1, xmax, ymax)
    assert boxes(sample) == [(10.0, 10.0, 70.0, 60.0), (0.0, 0.0, 5.0, 5.0), (50.0, 10.0, 70.0, 60.0)]
    assert sample.regions[2].meta == {"entity_id": "23", "phrase_type": ["bodyparts", "people"], "sentence": 2,
                                      "span": [0, 6]}  # fmt: skip
    assert len(sample.meta["sentences"]) == 3 and sample.meta["split"] == "test"
    assert skipped.as_dict() == {
        "bad_record": 1,  # truncated XML of image 2000
        "region_nobox": 1,
        "region_notvisual": 1,
        "region_scene": 1,
        "region_unknown_entity": 1,
    }


def test_flickr30k_each_box_per_sentence(tmp_path):
    root = flickr_root(tmp_path)
    got = list(iter_flickr30k(root, SkipCounter(), boxes="each", per="sentence"))
    assert [s.key for s in got] == ["1000_0", "1000_1", "1000_2"]  # 2000 is malformed
    assert [r.phrase for r in got[0].regions] == ["Two young guys", "Two young guys", "a ball"]
    assert [r.meta["box_index"] for r in got[0].regions[:2]] == [0, 1]
    assert got[1].caption == "Two young guys look at each other and a cat ."


def test_flickr30k_without_split_records_each_image_split(tmp_path):
    root = flickr_root(tmp_path)
    (root / "Sentences" / "3000.txt").write_text("[/EN#5/animals A dog] runs .\n")
    (root / "Annotations" / "3000.xml").write_text(
        "<annotation><size><width>20</width><height>20</height></size>"
        "<object><name>5</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object>"
        "</annotation>"
    )
    got = {s.key: s.meta["split"] for s in iter_flickr30k(root, SkipCounter())}
    assert got == {"1000": "test", "3000": "unknown"}  # 3000 is in no split list (2000 is malformed)
    per_sentence = list(iter_flickr30k(root, SkipCounter(), per="sentence"))
    assert [(s.key, s.meta["split"]) for s in per_sentence][-2:] == [("1000_2", "test"), ("3000_0", "unknown")]
    (root / "train.txt").write_text("3000\n")
    assert {s.key: s.meta["split"] for s in iter_flickr30k(root, SkipCounter())} == {"1000": "test", "3000": "train"}
    assert [s.meta["split"] for s in iter_flickr30k(root, SkipCounter(), split="train")] == ["train"]


def test_flickr30k_malformed_annotation_names_file(tmp_path):
    from cloc_data.converters.flickr30k import read_annotation

    bad = tmp_path / "5.xml"
    bad.write_text("<annotation><object><name>1</name></object></annotation>")  # no <size>
    with pytest.raises(ValueError, match=r"5\.xml: no <size>"):
        read_annotation(bad)
    bad.write_text("<annotation><size><width>9</width><height>9</height></size>"
                   "<object><name>1</name><bndbox><xmin>1</xmin></bndbox></object></annotation>")  # fmt: skip
    with pytest.raises(ValueError, match="<bndbox> has no <ymin>"):
        read_annotation(bad)


# --- COCO / LVIS ------------------------------------------------------------------------------------


def coco_file(tmp_path):
    data = {
        "images": [
            {"id": 1, "file_name": "000000000001.jpg", "width": 64, "height": 48},
            {"id": 2, "file_name": "000000000002.jpg", "width": 32, "height": 32},
            {"id": 3, "file_name": "000000000003.jpg", "width": 32, "height": 32},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 20], "iscrowd": 0},
            {"id": 11, "image_id": 1, "category_id": 2, "bbox": [5, 5, 5, 5], "iscrowd": 1},
            {"id": 12, "image_id": 1, "category_id": 2, "bbox": [30, 10, 0, 5], "iscrowd": 0},
            {"id": 13, "image_id": 1, "category_id": 77, "bbox": [1, 1, 2, 2], "iscrowd": 0},
            {"id": 14, "image_id": 2, "category_id": 2, "bbox": [0, 0, 32, 32], "iscrowd": 0},
            {"id": 15, "image_id": 9, "category_id": 2, "bbox": [0, 0, 1, 1], "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "traffic light"}],
    }
    return write_json(tmp_path / "instances_val2017.json", data)


def test_coco_instances(tmp_path):
    skipped = SkipCounter()
    got = list(iter_coco_instances(coco_file(tmp_path), skipped))
    assert [s.key for s in got] == ["1", "2"]
    assert [r.phrase for r in got[0].regions] == ["person"] and boxes(got[0]) == [(1.0, 2.0, 11.0, 22.0)]
    assert got[0].regions[0].meta == {"category_id": 1, "ann_id": 10}
    assert got[1].regions[0].phrase == "traffic light" and got[0].meta["dataset"] == "coco"
    assert skipped.as_dict() == {
        "no_regions": 1,
        "region_bad_entry": 1,
        "region_crowd": 1,
        "region_invalid_box": 1,
        "region_unknown_image": 1,
    }


def test_lvis_instances(tmp_path):
    data = {
        "images": [{"id": 5, "coco_url": "http://images.cocodataset.org/val2017/000000000005.jpg", "width": 50,
                    "height": 40, "neg_category_ids": [2], "not_exhaustive_category_ids": []}],
        "annotations": [{"id": 1, "image_id": 5, "category_id": 1, "bbox": [1.5, 2.5, 10, 10]}],
        "categories": [{"id": 1, "name": "traffic_light", "synonyms": ["traffic_light", "stop_light"],
                        "frequency": "f"}],
    }  # fmt: skip
    (sample,) = iter_coco_instances(write_json(tmp_path / "lvis_v1_val.json", data), SkipCounter())
    assert sample.meta["dataset"] == "lvis" and sample.meta["image_path"] == "val2017/000000000005.jpg"
    assert sample.meta["neg_category_ids"] == [2]
    region = sample.regions[0]
    assert region.phrase == "traffic light" and boxes(sample) == [(1.5, 2.5, 11.5, 12.5)]
    assert region.meta == {
        "category_id": 1,
        "ann_id": 1,
        "synonyms": ["traffic light", "stop light"],
        "frequency": "f",
    }


# --- CLI --------------------------------------------------------------------------------------------


def test_cli_convert_coco_with_images_and_stats(tmp_path, capsys):
    ann = coco_file(tmp_path)
    images = tmp_path / "images"
    write_image(images / "val2017" / "000000000001.jpg", (64, 48), "JPEG")  # found in a sub-folder
    write_image(images / "000000000002.jpg", (31, 32), "JPEG")  # wrong size -> size_mismatch
    out = tmp_path / "out"
    assert (
        cli_main(
            ["convert", "--format", "coco", "--input", str(ann), "--images", str(images), "--out", str(out)]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "wrote 1 samples" in printed and "size_mismatch: 1" in printed
    (sample,) = iter_shard_samples(list_shards(out))
    assert sample.key == "1" and sample.image.size == (64, 48)
    report = json.loads((out / "conversion_report.json").read_text())
    assert (
        report["samples"] == 1
        and report["skipped"]["size_mismatch"] == 1
        and report["skipped"]["region_crowd"] == 1
    )

    assert cli_main(["stats", str(out)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["samples"] == 1 and stats["regions"] == 1 and stats["regions_per_image"]["mean"] == 1.0
    assert stats["conversion_skipped"]["size_mismatch"] == 1


def test_cli_missing_images_counted_or_annotation_only(tmp_path, capsys):
    regions_path, image_data_path = vg_files(tmp_path)
    out = tmp_path / "vg"
    args = ["convert", "--format", "vg", "--input", str(regions_path), "--image-data", str(image_data_path)]
    assert cli_main([*args, "--out", str(out)]) == 1  # nothing written: an error, not a silent success
    printed = capsys.readouterr()
    assert "missing_image: 2" in printed.out and list_shards(out) == []
    assert printed.err.strip() == (
        f"cloc-data: error: {regions_path}: no samples written (skipped: missing_image 2, bad_record 1, "
        "no_regions 1, region_bad_entry 1); pass --images DIR (the image root) or --annotations-only"
    )
    # annotation-only: image 1 (known size) is kept; image 3 (unknown size) cannot be
    out2 = tmp_path / "vg_ann"
    assert cli_main([*args, "--out", str(out2), "--annotations-only"]) == 0
    assert "unknown_size: 1" in capsys.readouterr().out
    (sample,) = iter_shard_samples(out2, require_image=False)
    assert sample.key == "1" and sample.image is None
    # with images: the size of image 3 comes from the file
    images = tmp_path / "vg_images"
    write_image(images / "VG_100K_2" / "1.jpg", (100, 80), "JPEG")
    write_image(images / "VG_100K" / "3.jpg", (60, 20), "JPEG")
    out3 = tmp_path / "vg_img"
    assert cli_main([*args, "--out", str(out3), "--images", str(images), "--max-samples", "5"]) == 0
    capsys.readouterr()
    got = {s.key: s for s in iter_shard_samples(out3)}
    assert sorted(got) == ["1", "3"] and (got["3"].width, got["3"].height) == (60, 20)


def test_cli_refcoco_embedded_images_and_arg_errors(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"question_id": str(i), "image": {"bytes": image_bytes((40, 30), "JPEG"), "path": None}, "question": "q",
         "answer": [f"thing {i}"], "segmentation": [], "bbox": [1.0, 1.0, 5.0, 5.0], "iscrowd": 0,
         "file_name": f"{i}.jpg"}
        for i in range(3)
    ]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "val.parquet")
    out = tmp_path / "rc"
    argv = ["convert", "--format", "refcoco", "--input", str(tmp_path / "val.parquet"), "--split", "val"]
    assert cli_main([*argv, "--out", str(out), "--max-samples", "2", "--shard-size", "1"]) == 0
    capsys.readouterr()
    assert [os.path.basename(p) for p in list_shards(out)] == ["shard-000000.tar", "shard-000001.tar"]
    got = list(iter_shard_samples(out, decode_images=False))
    assert [s.key for s in got] == ["q_0", "q_1"] and got[0].image == rows[0]["image"]["bytes"]
    assert (got[0].width, got[0].height) == (40, 30)

    with pytest.raises(SystemExit):
        cli_main(["convert", "--format", "coco", "--input", "x.json", "--out", str(out), "--split", "val"])
    with pytest.raises(SystemExit):
        cli_main(["convert", "--format", "refcoco", "--input", "x", "--out", str(out), "--per", "sentence",
                  "--split", "val"])  # fmt: skip
    assert (
        cli_main(["convert", "--format", "coco", "--input", str(tmp_path / "nope.json"), "--out", str(out)])
        == 2
    )
    assert "nope.json" in capsys.readouterr().err


def test_row_folders_read_parquet_and_jsonl_only(tmp_path):
    folder = tmp_path / "grit"
    (folder / "part1").mkdir(parents=True)
    (folder / "part1" / "a.jsonl").write_text(json.dumps(GRIT_ROW) + "\n")
    write_json(folder / "00000_stats.json", {"count": 1})  # img2dataset-style side file, not rows
    skipped = SkipCounter()
    assert [s.key for s in iter_grit(folder, skipped)] == ["000010002"] and skipped.total == 0
    with pytest.raises(FileNotFoundError, match="missing"):
        list(iter_grit(tmp_path / "missing", SkipCounter()))
