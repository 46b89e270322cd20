"""The data pipeline: sources, processing, bad samples, mixtures, streaming, Ray Train sharding."""
from __future__ import annotations

import io
import json
import random
import tarfile
from collections import Counter

import numpy as np
import pytest

from minigpt4.data import (Mixture, ProcessConfig, SampleError, SourceConfig, TrainingCollator, build_dataset,
                           clean_caption, expand_braces, iter_units, read_errors, summarize)
from minigpt4.data import io as uio
from minigpt4.data.sources import RawSample, UnitStats, iter_json_array, read_unit

TINY = dict(image_size=32, num_image_tokens=4)


def jpeg(seed: int, size=(40, 30), fmt="JPEG") -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def make_tar(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def good(key: str, seed: int) -> tuple[str, dict[str, bytes]]:
    return key, {"jpg": jpeg(seed), "json": json.dumps({"caption": f"A photo: number {seed}!"}).encode(),
                 "txt": b"ignored when the json has a caption"}


def put(uri: str, data: bytes) -> None:
    uio.write_bytes(uri, data)


# -- pure functions -----------------------------------------------------------------------------
def test_expand_braces_keeps_padding_and_is_lazy():
    assert list(expand_braces("s3://b/{00000..00002}.tar")) == ["s3://b/00000.tar", "s3://b/00001.tar",
                                                                "s3://b/00002.tar"]
    assert list(expand_braces("d/{a,b}/{8..10}.tar")) == ["d/a/8.tar", "d/a/9.tar", "d/a/10.tar", "d/b/8.tar",
                                                          "d/b/9.tar", "d/b/10.tar"]
    it = expand_braces("x/{000000000..999999999}.tar")  # a billion names: must not be materialized
    assert next(it) == "x/000000000.tar" and next(it) == "x/000000001.tar"
    with pytest.raises(ValueError, match="cannot expand"):
        list(expand_braces("x/{1-3}.tar"))


def test_clean_caption_matches_blip_processor():
    assert clean_caption('A "Red" Circle: (big)!  #1; ~ok~') == "a red circle big 1 ok"
    assert clean_caption(" ".join(f"w{i}" for i in range(60))) == " ".join(f"w{i}" for i in range(50))
    assert clean_caption("...") == ""


def test_iter_json_array_streams_in_small_chunks():
    anns = [{"image_id": str(i), "caption": f"caption {i} with \"quotes\", [brackets] and {{braces}}"}
            for i in range(50)]
    data = json.dumps({"info": {"annotations": "decoy"}, "annotations": anns}, indent=1).encode()
    assert list(iter_json_array(io.BytesIO(data), chunk=7)) == anns
    assert list(iter_json_array(io.BytesIO(json.dumps(anns).encode()), chunk=5)) == anns
    with pytest.raises(ValueError, match="truncated"):
        list(iter_json_array(io.BytesIO(data[:len(data) // 2]), chunk=64))


def test_processor_stage_outputs(tiny_tokenizer):
    from minigpt4.data import Processor

    raw = RawSample("k1", jpeg(1), "A Red: Circle!")
    s1 = Processor(ProcessConfig(task="stage1", **TINY))(raw)
    assert s1["caption"] == "a red circle"
    assert s1["pixel_values"].shape == (3, 32, 32) and s1["pixel_values"].dtype == np.float32
    ids, labels = s1["input_ids"], s1["labels"]
    assert ids[0] == tiny_tokenizer.bos_token_id and list(ids[1:5]) == [-200] * 4 and s1["prompt_len"] == 5
    assert (labels[:5] == -100).all() and (labels[5:] == ids[5:]).all()
    assert tiny_tokenizer.decode(ids[5:]) == "a red circle\n"
    s2 = Processor(ProcessConfig(task="stage2", **TINY))(raw)
    text = tiny_tokenizer.decode([t for t in s2["input_ids"] if t >= 0])
    assert text.startswith("<s> ###Human: <Img>") and "###Assistant:" in text and text.endswith("A Red: Circle!###")
    # reproducible per (seed, epoch, key); the crop varies with the epoch
    rrc = ProcessConfig(task="caption", augment="random_resized_crop", **TINY)
    a, b, c = (Processor(rrc)(raw, epoch=e)["pixel_values"] for e in (0, 0, 1))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    with pytest.raises(SampleError) as e:
        Processor(ProcessConfig(task="stage1", **TINY))(RawSample("k", jpeg(1), "..."))
    assert e.value.reason == "empty_caption"


def test_random_resized_crop_box_bounds():
    from minigpt4.images import random_resized_crop_box

    rng = random.Random(0)
    for w, h in [(224, 224), (640, 480), (100, 1000), (3, 3)]:
        for _ in range(50):
            l, t, r, b = random_resized_crop_box(w, h, rng, (0.5, 1.0))
            assert 0 <= l < r <= w and 0 <= t < b <= h
            if w >= 100 and h >= 100 and 0.75 <= w / h <= 4 / 3:
                assert (r - l) * (b - t) >= 0.5 * w * h * 0.97


# -- one source per format, on the local S3 server ------------------------------------------------
def planted_shards(bucket: str) -> tuple[str, set[str], dict[str, str]]:
    """Three shards with 13 kinds of bad samples among good ones, plus a missing shard."""
    big = np.zeros((1000, 1200, 3), dtype=np.uint8)  # 1.2 MP > the test's 1 MP limit
    from PIL import Image

    bomb = io.BytesIO()
    Image.fromarray(big).save(bomb, format="PNG")
    valid = jpeg(99)
    bad = {
        "000000101": ("corrupt", {"jpg": valid[:200] + b"\x00" * 50 + valid[250:600], "txt": b"x y"}),
        "000000102": ("corrupt", {"jpg": valid[: len(valid) // 2], "txt": b"truncated jpeg"}),
        "000000103": ("empty", {"jpg": b"", "txt": b"zero bytes"}),
        "000000104": ("not_image", {"jpg": b"<html>not an image</html>", "txt": b"html"}),
        "000000105": ("too_large", {"png": bomb.getvalue(), "txt": b"a bomb"}),
        "000000106": ("bad_aspect", {"jpg": jpeg(5, size=(600, 4)), "txt": b"a sliver"}),
        "000000107": ("missing_caption", {"jpg": jpeg(6)}),
        "000000108": ("empty_caption", {"jpg": jpeg(7), "txt": b"   "}),
        "000000109": ("bad_caption_encoding", {"jpg": jpeg(8), "txt": b"caf\xe9 \xff"}),
        "000000110": ("bad_json", {"jpg": jpeg(9), "json": b"{not json", "txt": b"fine"}),
        "000000111": ("missing_image", {"txt": b"text only"}),
        "000000112": ("empty_caption", {"jpg": jpeg(10), "json": json.dumps({"caption": "!!! ..."}).encode()}),
    }
    goods = [good(f"0000000{i:02d}", i) for i in range(20)] + [good(f"00000020{i}", 200 + i) for i in range(8)]
    shard0 = goods[:10] + [(k, m) for k, (_, m) in list(bad.items())[:6]]
    shard1 = goods[10:20] + [(k, m) for k, (_, m) in list(bad.items())[6:]]
    shard2 = make_tar(goods[20:] + [good("000000300", 300)])
    cut = shard2.index(b"000000300.json")  # cut inside the last sample: the rest of the shard is gone
    root = f"s3://{bucket}/laion"
    put(f"{root}/00000.tar", make_tar(shard0))
    put(f"{root}/00001.tar", make_tar(shard1))
    put(f"{root}/00002.tar", shard2[:cut + 700])
    expected_bad = {k: reason for k, (reason, _) in bad.items()}
    expected_bad["000000300"] = "truncated_tar"
    expected_bad[f"{root}/00003.tar"] = "missing"
    return root + "/{00000..00003}.tar", {k for k, _ in goods}, expected_bad


def test_webdataset_with_planted_bad_samples(ray_cluster, s3_bucket):
    pattern, good_keys, expected_bad = planted_shards(s3_bucket)
    errors = f"s3://{s3_bucket}/errors"
    ds = build_dataset(SourceConfig(pattern, name="laion"),
                       ProcessConfig(task="stage1", max_pixels=1_000_000, **TINY), errors=errors)
    rows = ds.take_all()
    keys = [r["key"] for r in rows]
    assert Counter(keys) == Counter(good_keys)  # every good sample exactly once
    assert {r["caption"] for r in rows if r["key"] == "000000003"} == {"a photo number 3"}
    reported = {e["key"]: e["reason"] for e in read_errors(errors)}
    assert reported == expected_bad
    assert len({e["reason"] for e in read_errors(errors)}) >= 10
    report = summarize(errors)
    assert report.delivered == len(good_keys) and report.units == 4
    assert report.skipped == len(expected_bad)
    assert report.errors["corrupt"] == 2 and report.errors["truncated_tar"] == 1
    assert "skipped" in report.format() and "laion" in report.format()


def test_parquet_source(ray_cluster, s3_bucket):
    import pyarrow as pa
    import pyarrow.parquet as pq

    for f in range(2):
        t = pa.table({"url_key": [f"p{f}-{i}" for i in range(6)],
                      "image": [jpeg(f * 10 + i) if i != 5 else b"junk" for i in range(6)],
                      "text": [f"Caption {f} {i}" if i != 4 else None for i in range(6)]})
        buf = io.BytesIO()
        pq.write_table(t, buf, row_group_size=4)
        put(f"s3://{s3_bucket}/pq/part-{f}.parquet", buf.getvalue())
    put(f"s3://{s3_bucket}/pq/broken.parquet", b"PAR1 not really")
    src = SourceConfig(f"s3://{s3_bucket}/pq/", format="parquet", image_column="image", caption_column="text",
                       key_column="url_key")
    errors = f"s3://{s3_bucket}/errors"
    rows = build_dataset(src, ProcessConfig(task="stage2", **TINY), errors=errors).take_all()
    assert sorted(r["key"] for r in rows) == sorted(f"p{f}-{i}" for f in range(2) for i in range(4))
    assert {r["key"]: r["caption"] for r in rows}["p1-2"] == "Caption 1 2"
    got = {(e["key"], e["reason"]) for e in read_errors(errors)}
    assert got == {("p0-4", "missing_caption"), ("p1-4", "missing_caption"), ("p0-5", "not_image"),
                   ("p1-5", "not_image"), (f"s3://{s3_bucket}/pq/broken.parquet", "unreadable_parquet")}


def test_cc_sbu_align_source(ray_cluster, s3_bucket):
    root = f"s3://{s3_bucket}/align"
    anns = [{"image_id": str(i), "caption": f"The image shows shape {i}. It is red."} for i in range(7)]
    put(f"{root}/filter_cap.json", json.dumps({"annotations": anns}).encode())
    for i in range(7):
        if i != 3:
            put(f"{root}/image/{i}.jpg", jpeg(i))
    errors = f"s3://{s3_bucket}/errors"
    src = SourceConfig(root, format="cc_sbu_align", unit_size=3)
    assert [len(u["annotations"]) for u in iter_units(src)] == [3, 3, 1]
    rows = build_dataset(src, ProcessConfig(task="stage2", **TINY), errors=errors).take_all()
    assert sorted(r["key"] for r in rows) == ["0", "1", "2", "4", "5", "6"]
    assert {r["key"]: r["caption"] for r in rows}["5"] == anns[5]["caption"]  # stage 2 keeps the text as written
    assert [(e["key"], e["reason"]) for e in read_errors(errors)] == [("3", "missing")]


def test_image_prefix_source_keys_by_object_key(ray_cluster, s3_bucket):
    root = f"s3://{s3_bucket}/raw/"
    names = [f"a/{i:03d}.jpg" for i in range(5)] + ["b/x.png", "b/y.webp", "b/alpha.png"]
    for i, n in enumerate(names[:5]):
        put(root + n, jpeg(i))
    put(root + "b/x.png", jpeg(10, fmt="PNG"))
    put(root + "b/y.webp", jpeg(11, fmt="WEBP"))
    put(root + "b/alpha.png", b"\x89PNG\r\n\x1a\n broken")
    put(root + "b/notes.txt", b"not listed")
    errors = f"s3://{s3_bucket}/errors"
    src = SourceConfig(root, format="images", unit_size=3)
    assert len(list(iter_units(src))) == 3
    rows = build_dataset(src, ProcessConfig(task="caption", **TINY), errors=errors).take_all()
    assert sorted(r["key"] for r in rows) == sorted(n for n in names if n != "b/alpha.png")
    assert [(e["key"], e["reason"]) for e in read_errors(errors)] == [("b/alpha.png", "not_image")]


def test_listing_is_streamed_not_materialized(ray_cluster, s3_bucket, monkeypatch):
    """1,000 objects: building the dataset lists nothing; the listing is a generator consumed page by page
    inside one Ray task, and every object comes through once."""
    import boto3

    s3 = boto3.client("s3")
    tiny = jpeg(0, size=(8, 8))
    for i in range(1000):  # ~9 ms a PUT against moto; threads do not help (it shares our GIL)
        s3.put_object(Bucket=s3_bucket, Key=f"many/{i:05d}.jpg", Body=tiny)
    src = SourceConfig(f"s3://{s3_bucket}/many/", format="images", unit_size=100)
    calls = []
    monkeypatch.setattr(uio, "iter_objects", lambda *a, **k: calls.append(a) or iter(()))
    ds = build_dataset(src, ProcessConfig(task="caption", **TINY))
    assert calls == []  # lazy: the driver lists nothing when the dataset is built
    monkeypatch.undo()
    # the listing generator holds one page at a time: it yields the first unit after 1 page, not 10
    pages = []
    real = uio.client().get_paginator("list_objects_v2").paginate

    class CountingClient:
        def get_paginator(self, name):
            class P:
                def paginate(self, **kw):
                    for page in real(**kw, PaginationConfig={"PageSize": 100}):
                        pages.append(len(page.get("Contents", [])))
                        yield page
            return P()

    monkeypatch.setattr(uio, "client", lambda options=None: CountingClient())
    units = iter_units(src)
    first = next(units)
    assert len(first["uris"]) == 100 and len(pages) == 1
    monkeypatch.undo()
    assert ds.count() == 1000


# -- mixtures -----------------------------------------------------------------------------------
def test_mixture_follows_ratios_and_is_reproducible():
    opened = Counter()

    def open_stream(name, epoch):
        opened[name] += 1
        return iter([f"{name}-{epoch}-{i}" for i in range(3)])

    mix = Mixture(open_stream, {"laion": 115, "cc_sbu": 14}, seed=7)
    draws = [next(mix)[0] for _ in range(20000)]
    frac = draws.count("cc_sbu") / len(draws)
    assert abs(frac - 14 / 129) < 0.01
    assert opened["laion"] > 1000  # a stream that runs out starts its next epoch
    again = Mixture(open_stream, {"laion": 115, "cc_sbu": 14}, seed=7)
    assert [next(again)[0] for _ in range(200)] == draws[:200]
    with pytest.raises(RuntimeError, match="yields no batches"):
        next(Mixture(lambda n, e: iter(()), {"empty": 1}))


def test_mixture_over_ray_datasets(ray_cluster, s3_bucket):
    root = f"s3://{s3_bucket}"
    for name, n in (("a", 12), ("b", 12)):
        put(f"{root}/{name}/00000.tar", make_tar([good(f"{name}{i:08d}", i) for i in range(n)]))
    cfg = ProcessConfig(task="stage1", **TINY)
    datasets = {n: build_dataset(SourceConfig(f"{root}/{n}/00000.tar", name=n), cfg) for n in ("a", "b")}
    mix = Mixture(lambda n, epoch: datasets[n].iter_batches(batch_size=4), {"a": 3, "b": 1}, seed=0)
    seen = Counter()
    for _ in range(40):
        name, batch = next(mix)
        assert {k[0] for k in batch["key"]} == {name}
        seen[name] += 1
    assert seen["a"] > seen["b"] > 0


# -- Ray Train workers see disjoint shards ---------------------------------------------------------
def _collect_keys(config):
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    keys = []
    for batch in shard.iter_torch_batches(batch_size=8, collate_fn=TrainingCollator(config["pad"])):
        assert batch["input_ids"].shape == batch["labels"].shape and batch["pixel_values"].shape[1:] == (3, 32, 32)
        keys += batch["keys"]
    rank = ray.train.get_context().get_world_rank()
    with open(f"{config['out']}/keys-{rank}.json", "w") as f:
        json.dump(keys, f)


def test_train_workers_get_disjoint_shards(ray_cluster, s3_bucket, tmp_path, tiny_tokenizer):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    root = f"s3://{s3_bucket}/wds"
    all_keys = set()
    for s in range(4):
        samples = [good(f"{s:05d}{i:04d}", s * 100 + i) for i in range(10)]
        all_keys |= {k for k, _ in samples}
        put(f"{root}/{s:05d}.tar", make_tar(samples))
    ds = build_dataset(SourceConfig(f"{root}/"), ProcessConfig(task="stage1", **TINY), shuffle_seed=0)
    TorchTrainer(_collect_keys, train_loop_config={"out": str(tmp_path), "pad": tiny_tokenizer.pad_token_id},
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                 datasets={"train": ds},
                 run_config=RunConfig(storage_path=str(tmp_path / "runs"), name="shards")).fit()
    k0 = json.loads((tmp_path / "keys-0.json").read_text())
    k1 = json.loads((tmp_path / "keys-1.json").read_text())
    assert len(k0) == len(set(k0)) and len(k1) == len(set(k1))
    assert not set(k0) & set(k1)  # no sample seen twice within the epoch
    assert set(k0) | set(k1) <= all_keys and len(k0) + len(k1) >= len(all_keys) - 1  # equal split may drop 1
    assert abs(len(k0) - len(k1)) <= 1


def test_unit_reader_without_ray_reports_unreadable_local_files(tmp_path):
    st = UnitStats("w", "u")
    assert list(read_unit(SourceConfig(str(tmp_path / "nope.tar")), {"id": "u", "uri": str(tmp_path / "nope.tar")},
                          st)) == []
    assert st.errors[0][1] == "missing"
    with pytest.raises(ValueError, match="format must be one of"):
        SourceConfig("x", format="tfrecord")


# -- the synthetic dataset through every reader --------------------------------------------------
def test_synthetic_dataset_through_every_source(ray_cluster, s3_bucket):
    from minigpt4.synthetic import write_dataset

    root = f"s3://{s3_bucket}/syn"
    summary = write_dataset(root, seed=3, train_shards=2, samples_per_shard=6, align_samples=5, heldout_samples=4,
                            image_size=32, parquet_shards=1, progress=False)
    counts = summary["counts"]
    stage1 = ProcessConfig(task="stage1", **TINY)
    wds = build_dataset(SourceConfig(root + "/pretrain/{00000..00001}.tar"), stage1).take_all()
    assert len(wds) == counts["pretrain"] == 12
    tar = tarfile.open(fileobj=io.BytesIO(uio.read_bytes(f"{root}/pretrain/00001.tar")))
    meta = json.loads(tar.extractfile("000010003.json").read())
    assert {r["key"]: r["caption"] for r in wds}["000010003"] == clean_caption(meta["caption"])
    pq_rows = build_dataset(SourceConfig(root + "/pretrain_parquet/", format="parquet"), stage1).take_all()
    assert len(pq_rows) == counts["pretrain_parquet"] == 6 and not {r["key"] for r in pq_rows} & {r["key"] for r in wds}
    align = build_dataset(SourceConfig(root + "/align", format="cc_sbu_align"),
                          ProcessConfig(task="stage2", **TINY)).take_all()
    anns = json.loads(uio.read_bytes(f"{root}/align/filter_cap.json"))["annotations"]
    assert sorted((r["key"], r["caption"]) for r in align) == sorted((a["image_id"], a["caption"]) for a in anns)
    held = build_dataset(SourceConfig(root + "/heldout/images/", format="images"),
                         ProcessConfig(task="caption", **TINY)).take_all()
    images = json.loads(uio.read_bytes(f"{root}/heldout/annotations.json"))["images"]
    assert sorted(r["key"] for r in held) == sorted(i["file_name"].split("/", 1)[1] for i in images)


def test_explicit_s3_options_override_the_environment(s3_endpoint, s3_bucket, monkeypatch):
    put(f"s3://{s3_bucket}/x.bin", b"payload")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    opts = uio.S3Options(endpoint_url=s3_endpoint, region="us-east-1", max_attempts=1)
    assert uio.read_bytes(f"s3://{s3_bucket}/x.bin", opts) == b"payload"
    assert [u for u, _ in uio.iter_objects(f"s3://{s3_bucket}/", None, opts)] == [f"s3://{s3_bucket}/x.bin"]
    with pytest.raises(uio.ObjectError) as e:
        uio.read_bytes(f"s3://{s3_bucket}/x.bin", uio.S3Options(max_attempts=1))
    assert e.value.reason == "unreadable"
    with pytest.raises(uio.ObjectError) as e:
        uio.read_bytes(f"s3://{s3_bucket}/absent.bin", opts)
    assert e.value.reason == "missing"


# -- the jobs ----------------------------------------------------------------------------------------
def test_check_data_job_reports_bad_samples(tmp_path, capsys):
    import runpy
    import subprocess
    import sys

    from conftest import cli_error

    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "00000.tar").write_bytes(make_tar([good(f"{i:09d}", i) for i in range(5)]
                                                            + [("000000009", {"jpg": b"", "txt": b"empty"})]))
    out = subprocess.run([sys.executable, "jobs/check_data.py", "--source", str(tmp_path / "shards"),
                          "--image-size", "32", "--errors", str(tmp_path / "errors"), "--num-cpus", "1",
                          "data.process.num_image_tokens=4"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "data: 5 samples delivered, 1 skipped, from 1 units" in out.stdout
    assert "skipped        1  empty" in out.stdout
    assert read_errors(str(tmp_path / "errors"))[0]["key"] == "000000009"
    main = runpy.run_path("jobs/check_data.py")["main"]  # its bad-config case in-process
    assert "unknown config key" in cli_error(capsys, main(["--source", "x", "data.nope=1"]))


@pytest.mark.slow
def test_throughput_bench_runs_and_writes_its_table(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "bench/data_throughput.py", "--images", "24", "--cpus", "1",
                          "--source-px", "96x64", "--size", "32", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "data_throughput.json").read_text())["rows"]
    assert [r["path"].split(":")[0] for r in rows] == ["PIL loop (1 process)"] + ["pipeline"] * 3
    assert all(r["images_per_s"] > 0 for r in rows)
    assert "| PIL loop (1 process) | 1 |" in (tmp_path / "data_throughput.md").read_text()


def test_tokenizer_from_an_s3_llm_directory_fetches_only_tokenizer_files(s3_bucket, tiny_tokenizer):
    from pathlib import Path

    from minigpt4.data.process import _tokenizer
    from minigpt4.tokenizer import load_tokenizer

    src = Path(load_tokenizer().name_or_path)
    for f in src.iterdir():
        put(f"s3://{s3_bucket}/llm/{f.name}", f.read_bytes())
    put(f"s3://{s3_bucket}/llm/model-00001-of-00002.safetensors", b"big weights stay in S3")
    tok = _tokenizer(f"s3://{s3_bucket}/llm/")
    assert tok("a red circle").input_ids == tiny_tokenizer("a red circle").input_ids
    cached = Path(tok.name_or_path)
    assert not (cached / "model-00001-of-00002.safetensors").exists()
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        _tokenizer(f"s3://{s3_bucket}/nothing-here/")


def test_local_image_directory_keys_are_relative_with_or_without_slash(tmp_path):
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    (tmp_path / "imgs" / "a.jpg").write_bytes(jpeg(1))
    (tmp_path / "imgs" / "sub" / "b.png").write_bytes(jpeg(2, fmt="PNG"))
    for path in (str(tmp_path / "imgs"), str(tmp_path / "imgs") + "/"):
        src = SourceConfig(path, format="images")
        (unit,) = list(iter_units(src))
        st = UnitStats("images", unit["id"])
        assert [s.key for s in read_unit(src, unit, st)] == ["a.jpg", "sub/b.png"] and not st.errors


# -- exact resume: unit markers, positions, the listing that honours them ----------------------------
def _local_shards(tmp_path, shards: int, per_shard: int) -> str:
    for s in range(shards):
        (tmp_path / f"{s:05d}.tar").write_bytes(make_tar([good(f"{s:05d}{i:04d}", s * 100 + i)
                                                          for i in range(per_shard)]))
    return str(tmp_path / ("{00000..%05d}.tar" % (shards - 1)))


def test_list_epochs_marks_units_and_resumes_from_a_position(tmp_path):
    from minigpt4.data import list_epochs

    src = SourceConfig(_local_shards(tmp_path, 4, 1), name="w")
    units = list(list_epochs(src, None, shuffle_seed=7, epochs=2))
    assert [(u["epoch"], u["index"], u["last"]) for u in units] == [
        (0, 0, False), (0, 1, False), (0, 2, False), (0, 3, True), (1, 0, False), (1, 1, False), (1, 2, False),
        (1, 3, True)]
    assert sorted(u["id"] for u in units[:4]) == sorted(u["id"] for u in units[4:])  # each epoch: every shard once
    assert [u["id"] for u in units[:4]] != [u["id"] for u in units[4:]]  # in a new order
    # resume inside epoch 1: before (1, 1) and the done (1, 3) are skipped; the epoch is listed alone
    pos = {"low": [1, 1], "done": [[1, 3, True]]}
    resumed = list(list_epochs(src, None, shuffle_seed=7, epochs=1, position=pos))
    assert [(u["epoch"], u["index"]) for u in resumed] == [(1, 1), (1, 2)]
    assert [u["id"] for u in resumed] == [units[5]["id"], units[6]["id"]]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no units"):
        list(list_epochs(SourceConfig(str(tmp_path / "empty") + "/", name="e"), None, None))


def test_position_tracker_counts_rows_across_workers_and_epochs():
    from minigpt4.data import PositionTracker

    a, b = PositionTracker(), PositionTracker()
    # unit (0,0): 3 rows (2 on worker a, the last on b); (0,1): empty placeholder; (0,2): 2 rows, 1 consumed
    a.consume([(0, 0, -1, False), (0, 0, -1, False), (0, 2, -1, False)])
    b.consume([(0, 0, 3, False), (0, 1, 0, False)])
    deltas = [a.take_delta(), b.take_delta()]
    for t in (a, b):
        t.merge(deltas)
        assert t.position() == {"low": [0, 2], "done": []}  # (0,0) and (0,1) done, (0,2) in flight
    # (0,3) finishes (the epoch's last unit) before (0,2) does: it is done past `low`
    a.consume([(0, 3, 1, True)])
    for t in (a, b):
        t.merge([a.take_delta() if t is a else {}, {}])
    assert a.position() == {"low": [0, 2], "done": [[0, 3, True]]}
    a.consume([(0, 2, 2, False)])
    a.merge([a.take_delta()])
    assert a.position() == {"low": [1, 0], "done": []}  # past the last unit of epoch 0
    # an epoch whose stream ended moves the position on, whatever an equal split or drop_last dropped
    c = PositionTracker({"low": [1, 0], "done": []})
    c.consume([(1, 0, -1, False)])
    c.end_epoch(1)
    c.merge([c.take_delta()])
    assert c.position() == {"low": [2, 0], "done": []} and not c.partial


def test_collator_reports_units_and_drops_placeholders(tiny_tokenizer):
    batch = {"key": np.array(["a", "", "b"]), "pixel_values": np.zeros((3, 3, 4, 4), np.float32),
             "input_ids": np.array([np.array([1, 5, 6]), np.zeros(0, np.int64), np.array([1, 7])], dtype=object),
             "labels": np.array([np.array([-100, 5, 6]), np.zeros(0, np.int64), np.array([-100, 7])], dtype=object),
             "prompt_len": np.array([1, 0, 1]), "unit_epoch": np.array([0, 0, 0]), "unit_index": np.array([4, 5, 6]),
             "unit_rows": np.array([-1, 0, 9]), "unit_last": np.array([False, False, True])}
    out = TrainingCollator(tiny_tokenizer.pad_token_id)(batch)
    assert out["keys"] == ["a", "b"] and out["input_ids"].shape[0] == 2 and out["pixel_values"].shape[0] == 2
    assert out["units"] == [(0, 4, -1, False), (0, 5, 0, False), (0, 6, 9, True)]
    only = {k: v[1:2] for k, v in batch.items()}
    assert TrainingCollator(0)(only) == {"units": [(0, 5, 0, False)], "empty": True}


def test_length_bucketing_cuts_sorted_full_batches_with_less_padding_and_every_marker(tiny_tokenizer):
    """train.length_buckets: a read of 4 batches' worth of rows comes back as full batches of rows of
    similar length; every row trains at most once, the rows past the last full batch (and a placeholder)
    are still reported to the position tracker, and padding falls against batching rows as they come."""
    rng = np.random.default_rng(0)
    n, lengths = 35, rng.integers(3, 40, size=35)  # 35 real rows: 4 batches of 8 and 3 left over
    ids = np.empty(n + 1, dtype=object)
    ids[:] = [np.arange(1, k + 1) for k in lengths] + [np.zeros(0, np.int64)]
    batch = {"key": np.array([f"k{i:02d}" for i in range(n)] + [""]), "input_ids": ids, "labels": ids.copy(),
             "pixel_values": np.arange(n + 1, dtype=np.float32)[:, None, None, None] * np.ones((1, 3, 2, 2), np.float32),
             "prompt_len": np.ones(n + 1, np.int64), "unit_epoch": np.zeros(n + 1, np.int64),
             "unit_index": np.arange(n + 1) // 9, "unit_rows": np.array([-1] * n + [0]), "unit_last": np.zeros(n + 1, bool)}
    out = TrainingCollator(tiny_tokenizer.pad_token_id, batch_size=8, seed=3)(batch)
    parts = out["parts"]
    assert [len(p["keys"]) for p in parts] == [8, 8, 8, 8]
    trained = [k for p in parts for k in p["keys"]]
    assert len(set(trained)) == 32 and "" not in trained
    # the 32 shortest rows, 8 of similar length per batch; pixels travel with their keys
    assert set(trained) == {f"k{i:02d}" for i in np.argsort(lengths, kind="stable")[:32]}
    for p in parts:
        assert [float(x) for x in p["pixel_values"][:, 0, 0, 0]] == [float(k[1:]) for k in p["keys"]]
        assert p["input_ids"].shape[1] == max(lengths[int(k[1:])] for k in p["keys"])
    # every row's marker reaches the tracker once: 35 real rows and the placeholder
    markers = [u for p in parts for u in p.get("units", [])]
    assert len(markers) == 36 and sorted(markers) == sorted(
        zip(batch["unit_epoch"].tolist(), batch["unit_index"].tolist(), batch["unit_rows"].tolist(),
            batch["unit_last"].tolist()))
    # batches come in a seeded random order, not shortest first
    order = [p["input_ids"].shape[1] for p in parts]
    assert order != sorted(order)
    assert [p["keys"] for p in TrainingCollator(0, batch_size=8, seed=3)(batch)["parts"]] == [p["keys"] for p in parts]
    # padded positions against the same rows in the order they came, 8 at a time
    padded = sum(p["attention_mask"].numel() - int(p["attention_mask"].sum()) for p in parts)
    plain = sum(8 * int(lengths[i:i + 8].max()) - int(lengths[i:i + 8].sum()) for i in range(0, 32, 8))
    assert padded < plain / 3
    # a read too short for one batch trains nothing but reports its rows
    short = {k: v[:5] for k, v in batch.items()}
    assert TrainingCollator(0, batch_size=8)(short) == {"parts": [{"units": [(0, 0, -1, False)] * 5, "empty": True}]}


def test_stream_starts_at_the_position_posted_on_the_board(ray_cluster, tmp_path, tiny_tokenizer):
    import ray

    from minigpt4.data import position_board

    pattern = _local_shards(tmp_path, 4, 3)
    corrupt = {"jpg": b"\xff\xd8 not a jpeg", "txt": b"a caption"}
    (tmp_path / "00002.tar").write_bytes(make_tar([("000020000", corrupt), ("000020001", corrupt)]))
    board = position_board()
    ds = build_dataset(SourceConfig(pattern, name="w"), ProcessConfig(task="stage1", **TINY), board=board,
                       rows_per_block=2)
    rows = ds.take_all()  # nothing posted: the whole epoch, with unit markers
    by_unit: dict = {}
    for r in rows:
        by_unit.setdefault(int(r["unit_index"]), []).append(r)
    assert sorted(by_unit) == [0, 1, 2, 3]
    for index, unit_rows in by_unit.items():
        finals = [int(r["unit_rows"]) for r in unit_rows if int(r["unit_rows"]) >= 0]
        assert len(finals) == 1  # exactly one row closes each unit, with its count (0: the all-bad shard)
        assert finals[0] == len([r for r in unit_rows if int(r["unit_rows"]) != 0])
    shard2 = next(i for i, rs in by_unit.items() if rs[0]["key"] == "")  # the all-bad shard: one placeholder
    assert [int(r["unit_rows"]) for r in by_unit[shard2]] == [0]
    ray.get(board.set.remote("w", {"low": [0, 1], "done": [[0, 3, True]]}))
    again = ds.take_all()  # a new execution reads the board: only units 1 and 2 of epoch 0
    assert sorted({int(r["unit_index"]) for r in again}) == [1, 2]
    assert sorted(r["key"] for r in again) == sorted(r["key"] for r in rows if int(r["unit_index"]) in (1, 2))


def test_mixture_streams_of_several_epochs_report_their_last_epoch():
    opened, ended = [], []

    def open_stream(name, epoch):
        opened.append(epoch)
        return iter([epoch] * 2)

    mix = Mixture(open_stream, {"a": 1.0}, epochs={"a": 4}, on_epoch_end=lambda n, e: ended.append(e),
                  epochs_per_stream=3)
    assert [next(mix)[1] for _ in range(6)] == [4, 4, 7, 7, 10, 10]
    assert opened == [4, 7, 10] and ended == [6, 9]


def test_unit_cache_serves_later_epochs_with_identical_rows(ray_cluster, tmp_path, tiny_tokenizer):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "00000.tar").write_bytes(make_tar([good(f"a{i}", i) for i in range(6)] +
                                                [("a9", {"jpg": b"<html>", "txt": b"not an image"})]))
    (shards / "00001.tar").write_bytes(make_tar([good(f"b{i}", 50 + i) for i in range(5)]))
    source = SourceConfig(str(shards / "{00000..00001}.tar"), name="w")
    stage2 = ProcessConfig(task="stage2", **TINY)  # the instruction is drawn per epoch: tokens differ by epoch

    def rows(cache_dir, errors):
        got = build_dataset(source, stage2, errors=str(errors), epochs=2, markers=True,
                            cache_dir=str(cache_dir) if cache_dir else None).take_all()
        return {(r["key"], r["unit_epoch"]): r for r in got}, summarize(str(errors))

    plain, plain_report = rows(None, tmp_path / "e0")
    cached, cached_report = rows(tmp_path / "cache", tmp_path / "e1")
    assert len(plain) == 2 * 11 and plain.keys() == cached.keys()
    for k, r in plain.items():
        for col in ("pixel_values", "input_ids", "labels", "caption", "prompt_len"):
            assert np.array_equal(r[col], cached[k][col]), (k, col)
    assert not np.array_equal(plain[("a0", 0)]["input_ids"], plain[("a0", 1)]["input_ids"]) or \
        not np.array_equal(plain[("a1", 0)]["input_ids"], plain[("a1", 1)]["input_ids"])
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2  # one file per unit, written in epoch 0
    # with the shards gone, a run on the same cache still delivers every row and the same bad sample
    for f in shards.iterdir():
        f.unlink()
    again, again_report = rows(tmp_path / "cache", tmp_path / "e2")
    assert again.keys() == plain.keys()
    assert np.array_equal(again[("b3", 1)]["pixel_values"], plain[("b3", 1)]["pixel_values"])
    # a unit's report is rewritten each epoch under the unit's name: the cached epochs report the same
    assert plain_report.errors == cached_report.errors == again_report.errors == {"not_image": 1}
    assert again_report.delivered == plain_report.delivered == 11


def test_cached_unit_comes_in_a_new_order_each_epoch(tmp_path, tiny_tokenizer):
    """A unit larger than the consumer's shuffle buffer would put the same samples in the same
    batches every epoch: loaded whole from the cache, it is permuted per epoch (seeded)."""
    from minigpt4.data.pipeline import process_units
    from minigpt4.data.sources import iter_units

    (tmp_path / "00000.tar").write_bytes(make_tar([good(f"a{i:02d}", i) for i in range(12)]))
    source = SourceConfig(str(tmp_path / "00000.tar"), name="w")
    (unit,) = iter_units(source)

    def keys(epoch: int, seed) -> list[str]:
        u = json.dumps({**unit, "epoch": epoch, "index": 0, "last": True})
        blocks = process_units({"unit": [u]}, source=source, process=ProcessConfig(task="stage1", **TINY),
                               errors=None, s3=None, epoch=epoch, rows_per_block=5,
                               cache_dir=str(tmp_path / "cache"), rows_seed=seed)
        return [str(k) for b in blocks for k in b["key"]]

    first = keys(0, 7)  # read from the source, kept in the cache: file order
    assert first == [f"a{i:02d}" for i in range(12)]
    e1, e2 = keys(1, 7), keys(2, 7)
    assert sorted(e1) == sorted(e2) == first and e1 != first and e2 != e1
    assert keys(1, 7) == e1 and keys(1, None) == first  # reproducible; no seed keeps file order


def test_unit_cache_skips_transient_failures_and_refuses_random_crops(tmp_path):
    from minigpt4.data.pipeline import UnitCache

    source, unit = SourceConfig(str(tmp_path / "x.tar")), {"id": "u1"}
    cache = UnitCache(str(tmp_path / "c"), source, ProcessConfig(task="stage1", **TINY))
    px = np.zeros((32, 32, 3), np.uint8)
    assert not cache.store(unit, [("k", "a cat", px)], [("x.tar", "unreadable", "connection reset")])
    assert cache.load(unit) is None
    assert cache.store(unit, [("k", "a cat", px)], [("k2", "corrupt", "bad jpeg")])
    samples, errors = cache.load(unit)
    assert [(k, c) for k, c, _ in samples] == [("k", "a cat")] and errors == [("k2", "corrupt", "bad jpeg")]
    with open(cache.path(unit), "wb") as f:  # damaged on disk: a miss, not a crash
        f.write(b"PK\x03\x04 not a whole zip")
    assert cache.load(unit) is None
    # another image size is another file
    other = UnitCache(str(tmp_path / "c"), source, ProcessConfig(task="stage1", image_size=64, num_image_tokens=4))
    assert other.load(unit) is None
    with pytest.raises(ValueError, match="random crops"):
        UnitCache(str(tmp_path / "c"), source, ProcessConfig(task="stage1", augment="random_resized_crop", **TINY))
    with pytest.raises(ValueError, match="random crops"):
        build_dataset(source, ProcessConfig(task="stage1", augment="random_resized_crop", **TINY),
                      cache_dir=str(tmp_path / "c"))
