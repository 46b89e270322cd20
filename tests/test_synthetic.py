"""synthetic.write_dataset (layouts, determinism, S3), the LocalS3 server and jobs/make_synthetic.py."""
from __future__ import annotations

import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest
from PIL import Image

from minigpt4.s3server import LocalS3
from minigpt4.synthetic import Scene, Shape, write_dataset

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "make_synthetic.py"
TINY = dict(train_shards=2, samples_per_shard=8, align_samples=6, heldout_samples=6, image_size=32, progress=False)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    write_dataset(str(out), seed=0, parquet_shards=1, **TINY)
    return out


def test_same_seed_gives_identical_bytes_and_another_seed_differs(dataset, tmp_path):
    write_dataset(str(tmp_path / "again"), seed=0, parquet_shards=1, **TINY)
    write_dataset(str(tmp_path / "other"), seed=1, parquet_shards=1, **TINY)
    first, again, other = _files(dataset), _files(tmp_path / "again"), _files(tmp_path / "other")
    assert first == again
    assert other.keys() == first.keys()
    assert other["pretrain/00000.tar"] != first["pretrain/00000.tar"]
    assert other["heldout/annotations.json"] != first["heldout/annotations.json"]


def test_shard_layout_regroups_the_same_stage1_scenes(tmp_path):
    def captions(root: Path) -> list[str]:
        out = []
        for tar_path in sorted((root / "pretrain").glob("*.tar")):
            with tarfile.open(tar_path) as tar:
                out += [tar.extractfile(m).read().decode() for m in sorted(tar.getmembers(), key=lambda m: m.name)
                        if m.name.endswith(".txt")]
        return out

    one = dict(TINY, align_samples=0, heldout_samples=0)
    write_dataset(str(tmp_path / "a"), seed=0, **dict(one, train_shards=3, samples_per_shard=64))
    write_dataset(str(tmp_path / "b"), seed=0, **dict(one, train_shards=1, samples_per_shard=192))
    a, b = captions(tmp_path / "a"), captions(tmp_path / "b")
    assert len(a) == 192 and a == b and len(set(a)) > 20


def test_manifest_lists_every_file(dataset):
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert sorted(manifest["files"]) == sorted(set(_files(dataset)) - {"manifest.json"})
    assert manifest["counts"] == {"pretrain": 16, "pretrain_parquet": 8, "align": 6, "heldout": 6}
    assert manifest["seed"] == 0 and manifest["image_size"] == 32


def test_pretrain_tars_are_img2dataset_shards(dataset):
    import pyarrow.parquet as pq

    for shard in range(2):
        with tarfile.open(dataset / "pretrain" / f"{shard:05d}.tar") as tar:
            members = tar.getmembers()
            data = {m.name: tar.extractfile(m).read() for m in members}
        names = [m.name for m in members]
        keys = [f"{shard:05d}{i:04d}" for i in range(8)]
        assert names == [f"{k}.{ext}" for k in keys for ext in ("jpg", "json", "txt")]
        assert all(len(k) == 9 and k.isdigit() for k in keys)
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o644)}
        for k in keys:
            meta = json.loads(data[f"{k}.json"])
            assert meta["caption"] == data[f"{k}.txt"].decode()
            assert meta | {"caption": None} == {"key": k, "caption": None, "status": "success", "width": 32,
                                                "height": 32, "error_message": None, "url": f"synthetic://{k}"}
            assert Image.open(io.BytesIO(data[f"{k}.jpg"])).size == (32, 32)
        table = pq.read_table(dataset / "pretrain" / f"{shard:05d}.parquet").to_pylist()
        assert [r["key"] for r in table] == keys
        assert [r["caption"] for r in table] == [data[f"{k}.txt"].decode() for k in keys]
        stats = json.loads((dataset / "pretrain" / f"{shard:05d}_stats.json").read_text())
        assert stats["count"] == stats["successes"] == stats["status_dict"]["success"] == 8


def test_parquet_shards_hold_their_own_scenes(dataset):
    import pyarrow.parquet as pq

    rows = pq.read_table(dataset / "pretrain_parquet" / "part-00000.parquet").to_pylist()
    assert len(rows) == 8 and [r["key"] for r in rows] == [f"00002{i:04d}" for i in range(8)]  # after the tars
    assert all(Image.open(io.BytesIO(r["jpg"])).size == (32, 32) and r["caption"] for r in rows)
    with tarfile.open(dataset / "pretrain" / "00000.tar") as tar:
        tar_jpgs = {tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")}
    assert not tar_jpgs & {r["jpg"] for r in rows}


def test_align_is_cc_sbu_align_layout(dataset):
    anns = json.loads((dataset / "align" / "filter_cap.json").read_text())["annotations"]
    assert [a["image_id"] for a in anns] == [str(i) for i in range(6)]
    for a in anns:
        assert (dataset / "align" / "image" / f"{a['image_id']}.jpg").is_file()
        assert a["caption"].startswith("The image shows")
    assert len(list((dataset / "align" / "image").iterdir())) == 6


def test_heldout_annotations_match_images_and_ground_truth(dataset):
    held = json.loads((dataset / "heldout" / "annotations.json").read_text())
    keys = [f"h{i:06d}" for i in range(6)]
    assert [im["id"] for im in held["images"]] == keys
    for im in held["images"]:
        path = dataset / "heldout" / im["file_name"]
        assert Image.open(path).size == (im["width"], im["height"]) == (32, 32)
    assert sorted(p.name for p in (dataset / "heldout" / "images").iterdir()) == [f"{k}.jpg" for k in keys]
    for k in keys:
        shapes = tuple(Shape(o["colour"], o["shape"], o["cx"], o["cy"], o["size"])
                       for o in held["objects"] if o["image_id"] == k)
        assert 1 <= len(shapes) <= 2
        scene = Scene(shapes, held["background"][k])  # the ground truth reproduces both captions exactly
        assert [a["caption"] for a in held["annotations"] if a["image_id"] == k] == [scene.caption(),
                                                                                      scene.description()]


def test_writes_to_s3_the_same_bytes_as_locally(dataset, s3_bucket):
    from minigpt4.data.io import iter_objects, read_bytes

    prefix = f"s3://{s3_bucket}/synthetic"
    summary = write_dataset(prefix, seed=0, parquet_shards=1, **TINY)
    local = _files(dataset)
    listed = {uri[len(prefix) + 1:]: size for uri, size in iter_objects(prefix)}
    assert sorted(listed) == sorted(json.loads(local["manifest.json"])["files"] + ["manifest.json"])
    assert summary["files"] == len(listed) and summary["bytes"] == sum(listed.values())
    for rel in ("pretrain/00001.tar", "heldout/annotations.json", "manifest.json"):
        assert read_bytes(f"{prefix}/{rel}") == local[rel]


def test_missing_bucket_is_a_clear_error(s3_endpoint):
    from minigpt4.data.io import ObjectError

    with pytest.raises(ObjectError, match="no such bucket"):
        write_dataset("s3://no-such-bucket/x", **TINY)


def test_local_s3_refuses_remote_bind_and_restores_env(s3_endpoint):
    with pytest.raises(ValueError, match="allow_remote"):
        LocalS3("0.0.0.0")
    before = os.environ["AWS_ENDPOINT_URL"]
    with LocalS3() as server:
        server.apply_env()
        assert os.environ["AWS_ENDPOINT_URL"] == server.endpoint != before
        server.create_bucket("twice")
        server.create_bucket("twice")  # idempotent
        assert "twice" in {b["Name"] for b in server.client().list_buckets()["Buckets"]}
        with pytest.raises(OSError, match="cannot bind"):
            LocalS3(port=server.port).start()
    assert os.environ["AWS_ENDPOINT_URL"] == before


def _load_job():
    spec = importlib.util.spec_from_file_location("make_synthetic", JOB)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


TINY_ARGS = ["--train-shards", "1", "--samples-per-shard", "4", "--align", "2", "--heldout", "2", "--image-size", "32"]


def test_job_runs_as_a_script_and_prints_where(tmp_path):
    out = tmp_path / "syn"
    run = subprocess.run([sys.executable, str(JOB), "--out", str(out), *TINY_ARGS, "--no-progress"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr
    assert str(out) in run.stdout
    assert json.loads((out / "manifest.json").read_text())["counts"]["pretrain"] == 4


def test_job_default_out_is_data_synthetic(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert _load_job().main([*TINY_ARGS, "--no-progress"]) == 0
    assert str(tmp_path / "data" / "synthetic") in capsys.readouterr().out
    assert (tmp_path / "data" / "synthetic" / "manifest.json").is_file()


def test_job_missing_bucket_exits_2_with_one_line(s3_endpoint, capsys):
    assert _load_job().main(["--out", "s3://no-such-bucket/x", *TINY_ARGS, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such bucket" in err


def test_job_local_s3_serves_until_interrupted():
    import boto3

    proc = subprocess.Popen([sys.executable, str(JOB), "--local-s3", *TINY_ARGS, "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    watchdog = threading.Timer(120, proc.kill)
    watchdog.start()
    try:
        lines = []
        while not lines or not lines[-1].startswith("Ctrl-C"):
            line = proc.stdout.readline()
            assert line, f"job ended early: {''.join(lines)}{proc.stderr.read()}"
            lines.append(line)
        env = dict(l.strip()[len("export "):].split("=", 1) for l in lines if l.startswith("export "))
        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
        assert json.loads(s3.get_object(Bucket="synthetic", Key="manifest.json")["Body"].read())["counts"]["align"] == 2
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        proc.stderr.close()


def test_shapes_option_fixes_the_number_of_shapes(tmp_path):
    import json

    from minigpt4.synthetic import write_dataset

    write_dataset(str(tmp_path / "one"), seed=0, train_shards=0, align_samples=0, heldout_samples=12, image_size=16,
                  shapes=1, progress=False)
    ann = json.loads((tmp_path / "one" / "heldout" / "annotations.json").read_text())
    assert len(ann["objects"]) == 12  # one object per image
    with pytest.raises(ValueError, match="shapes must be"):
        write_dataset(str(tmp_path / "x"), shapes=3, progress=False)


def test_score_captions_needs_exactly_the_scene_objects():
    from minigpt4.synthetic import mentioned_objects, score_captions

    assert mentioned_objects("A large Red circle above two blue squares.") == {("red", "circle"), ("blue", "square")}
    ann = {"objects": [{"image_id": "a", "colour": "red", "shape": "circle"},
                       {"image_id": "b", "colour": "blue", "shape": "square"},
                       {"image_id": "b", "colour": "green", "shape": "triangle"},
                       {"image_id": "c", "colour": "yellow", "shape": "triangle"}]}
    caps = {"a": "There is a large red circle at the top left.",  # right
            "b": "a blue square left of a green triangle and an orange circle",  # invents an object
            "c": "a yellow square on a white background"}  # right colour, wrong shape
    s = score_captions(caps, ann)
    assert (s["correct"], s["images"], s["accuracy"]) == (1, 3, pytest.approx(1 / 3))
    assert s["colour_accuracy"] == 1.0 and s["shape_accuracy"] == 0.75
    assert [m["key"] for m in s["misses"]] == ["b", "c"]
    with pytest.raises(ValueError, match="no caption"):
        score_captions({"a": "a red circle"}, ann)
