"""The frozen-feature cache (minigpt4.features, jobs/features.py): the loss from cached features equals
the loss from pixels; the feature job writes one file per unit, skips and counts bad images and
resumes; the pipeline turns feature files into the same training rows as images; a stage-1 run reads
them end to end; mismatched features are refused before any work starts."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from minigpt4.data import io as uio
from minigpt4.model import IMAGE_TOKEN_ID, build_model, preset

SHARD_ROWS = 12
GOOD_IN_LAST = 5  # shard 3: hand-written, 5 good images and one corrupt


def _batch(n: int, text: int = 6, n_img: int = 4):
    ids = torch.randint(3, 600, (n, 1 + n_img + text))
    ids[:, 0], ids[:, 1:1 + n_img] = 1, IMAGE_TOKEN_ID
    labels = ids.clone()
    labels[:, :1 + n_img] = -100
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)


def test_loss_and_gradient_from_features_equal_those_from_pixels(tiny_model):
    torch.manual_seed(1)
    pixels, batch = torch.randn(3, 3, 32, 32), _batch(3)
    feats = tiny_model.image_features(pixels)
    assert feats.shape == (3, 4, 32)  # (B, num_query_tokens, qformer hidden): what the cache stores
    tiny_model.set_trainable()

    def run(**image):
        tiny_model.zero_grad(set_to_none=True)
        out = tiny_model(**batch, **image)
        out.loss.backward()
        return out, tiny_model.llama_proj.weight.grad.clone()

    px, px_grad = run(pixel_values=pixels)
    ft, ft_grad = run(image_feats=feats)  # fp32 features: bit for bit the same graph after the encoder
    assert torch.equal(px.loss, ft.loss) and torch.equal(px.logits, ft.logits) and torch.equal(px_grad, ft_grad)
    # float16 storage rounds each feature to 11 significant bits (relative error <= 4.9e-4): the loss
    # stays within 1e-4 (measured ~4e-6) and the logits within 1e-3 (measured ~1e-4)
    half, _ = run(image_feats=feats.half())
    assert abs(half.loss.item() - px.loss.item()) < 1e-4
    torch.testing.assert_close(half.logits, px.logits, atol=1e-3, rtol=0)
    assert not torch.equal(half.logits, px.logits)  # the fp16 path really was taken


def test_features_are_refused_where_they_cannot_stand_in_for_pixels(tiny_model):
    from minigpt4.data.pipeline import UnitCache
    from minigpt4.data.process import ProcessConfig
    from minigpt4.data.sources import SourceConfig
    from minigpt4.features import FeaturesConfig

    feats, batch = torch.zeros(2, 4, 32), _batch(2)
    with pytest.raises(ValueError, match="not both"):
        tiny_model(**batch, pixel_values=torch.zeros(2, 3, 32, 32), image_feats=feats)
    with pytest.raises(ValueError, match=r"image_feats must be \(batch, 4, 32\).*got \(2, 4, 64\)"):
        tiny_model(**batch, image_feats=torch.zeros(2, 4, 64))
    trains_vit = build_model(preset("tiny", train_vision=True))
    with pytest.raises(ValueError, match="frozen encoder, but model.train_vision is on"):
        trains_vit(**batch, image_feats=feats)
    with pytest.raises(ValueError, match="has no Q-Former"):
        preset("llama2_7b").check_cached_features()
    with pytest.raises(ValueError, match="model.train_qformer is on"):
        FeaturesConfig(model={"preset": "tiny", "train_qformer": True}).model_config()
    with pytest.raises(ValueError, match="dtype must be one of float16, float32"):
        FeaturesConfig(dtype="bfloat16")
    with pytest.raises(ValueError, match="already decoded"):
        UnitCache("/tmp/never-created", SourceConfig(path="/x", format="features"), ProcessConfig())


# -- the pipeline: feature files -> training rows ----------------------------------------------------
def _features_dir(root: Path, files: dict[str, tuple[np.ndarray, list, list]], dtype="float16") -> str:
    """A feature job's output by hand: the manifest fields the reader needs and the given files."""
    from minigpt4.data.sources import FEATURES_KIND, features_file

    (root / "data").mkdir(parents=True)
    (root / "_manifest.json").write_text(json.dumps({"kind": FEATURES_KIND, "num_query_tokens": 4,
                                                     "hidden_size": 32, "dtype": dtype}))
    for name, (feats, keys, captions) in files.items():
        (root / "data" / name).write_bytes(features_file(feats, {"keys": keys, "captions": captions}))
    return str(root)


def test_feature_files_become_the_same_training_rows_as_images(tmp_path, tiny_tokenizer):
    from ray.data.block import BlockAccessor

    from minigpt4.data.pipeline import TrainingCollator, process_units, read_errors
    from minigpt4.data.process import ProcessConfig, Processor
    from minigpt4.data.sources import RawSample, SourceConfig, iter_units

    rng = np.random.default_rng(0)
    good = rng.standard_normal((3, 4, 32)).astype(np.float16)
    captions = ["A Red Circle: on (grey)!", "", "Two blue squares."]
    path = _features_dir(tmp_path / "feats", {
        "00000000-a.npz": (good, ["k0", "k1", "k2"], captions),
        "00000001-b.npz": (rng.standard_normal((2, 4, 16)).astype(np.float16), ["x0", "x1"], ["c", "d"]),  # wrong D
        "00000002-c.npz": (good[:1], ["e0"], [None]),  # its only sample has no caption
    })
    (tmp_path / "feats" / "data" / "00000003-d.npz").write_bytes(b"PK\x03\x04 not a zip")
    source = SourceConfig(path=path, format="features", name="feats")
    units = list(iter_units(source))
    assert [u["id"].rsplit("/", 1)[-1] for u in units] == ["00000000-a.npz", "00000001-b.npz", "00000002-c.npz",
                                                            "00000003-d.npz"]
    assert units[0]["shape"] == [4, 32] and units[0]["dtype"] == "float16"
    process = ProcessConfig(task="stage1", image_size=32, num_image_tokens=4)
    blocks = []
    for i, u in enumerate(units):
        unit = {**u, "epoch": 0, "index": i, "last": i == len(units) - 1}
        # a block as Ray Data makes it of the UDF's output (a numpy batch or an Arrow table)
        blocks += [b if not isinstance(b, dict) else BlockAccessor.batch_to_block(b) for b in process_units(
            {"unit": [json.dumps(unit)]}, source=source, process=process, errors=str(tmp_path / "errors"), s3=None,
            epoch=0, rows_per_block=8, markers=True)]
    batches = [BlockAccessor.for_block(b).to_batch_format("numpy") for b in blocks]
    rows = [{k: v[i] for k, v in batch.items()} for batch in batches for i in range(len(batch["key"]))]
    real = [r for r in rows if r["unit_rows"] != 0]
    assert [r["key"] for r in real] == ["k0", "k2"]  # k1's caption is empty
    assert [r["unit_rows"] for r in rows] == [-1, 2, 0, 0, 0]  # 3 units without a good row: placeholders
    assert all("pixel_values" not in r for r in rows)
    assert all(np.asarray(r["image_feats"]).shape == (4, 32) for r in rows)  # placeholders too: one schema
    # the caption half is exactly the pixel path's: same cleaning, same tokens
    processor = Processor(process)
    for r, feats, caption in ((real[0], good[0], captions[0]), (real[1], good[2], captions[2])):
        pixel_row = processor.finish(*processor.decode(RawSample(r["key"], _jpeg(0), caption)))
        assert r["caption"] == pixel_row["caption"] != caption  # cleaned (lowercase, no punctuation)
        assert list(r["input_ids"]) == pixel_row["input_ids"].tolist() and r["prompt_len"] == pixel_row["prompt_len"]
        assert list(r["labels"]) == pixel_row["labels"].tolist()
        assert np.array_equal(np.asarray(r["image_feats"]), feats)
    errors = sorted((e["key"].rsplit("/", 1)[-1], e["reason"]) for e in read_errors(str(tmp_path / "errors")))
    assert errors == [("00000001-b.npz", "bad_features"), ("00000003-d.npz", "bad_features"),
                      ("e0", "missing_caption"), ("k1", "empty_caption")]
    # the collator hands the model image_feats (and no pixels); placeholders are dropped
    out = TrainingCollator(tiny_tokenizer.pad_token_id)(batches[0])
    assert out["image_feats"].dtype == torch.float16 and out["image_feats"].shape == (2, 4, 32)
    assert "pixel_values" not in out and out["keys"] == ["k0", "k2"]


# -- the job, on the local S3 server ---------------------------------------------------------------------
def _jpeg(seed: int) -> bytes:
    import random

    from minigpt4 import synthetic

    buf = io.BytesIO()
    synthetic.render(synthetic.random_scene(random.Random(seed), 1), 32).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(ray_cluster, s3_endpoint):
    """Three synthetic shards of 12 and a fourth of 5 good images and one corrupt one."""
    import boto3

    from minigpt4.synthetic import write_dataset

    boto3.client("s3").create_bucket(Bucket="feature-data")
    write_dataset("s3://feature-data/syn", seed=1, train_shards=3, samples_per_shard=SHARD_ROWS, align_samples=0,
                  heldout_samples=0, image_size=32, progress=False)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(GOOD_IN_LAST + 1):
            key = f"00003{i:04d}"
            image = _jpeg(i) if i != 2 else _jpeg(99)[:200]  # a truncated JPEG
            for name, data in ((f"{key}.jpg", image), (f"{key}.txt", f"a shape number {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    uio.write_bytes("s3://feature-data/syn/pretrain/00003.tar", buf.getvalue())
    return SimpleNamespace(pattern="s3://feature-data/syn/pretrain/{00000..00003}.tar", bad_key="000030002",
                           rows=3 * SHARD_ROWS + GOOD_IN_LAST)


def _features_job(inp: str, out: str, **kw):
    from minigpt4.features import FeaturesConfig

    return FeaturesConfig(**{**dict(input=inp, output=out, dtype="float32", batch_size=8, concurrency=[1],
                                    preprocess_cpus=0.5, cpus_per_actor=0.5, log_every=1.0), **kw})


@pytest.fixture(scope="module")
def features(shards):
    from minigpt4 import features

    out = "s3://feature-data/features/"
    lines: list[str] = []
    summary = features.run(_features_job(shards.pattern, out), say=lines.append)
    return SimpleNamespace(path=out, summary=summary, lines=lines)


def _files(prefix: str) -> list[str]:
    return [uri for uri, _ in uio.iter_objects(prefix)]


def test_feature_job_writes_one_file_per_unit_skips_bad_images_and_resumes(shards, features):
    from minigpt4 import features as fjob
    from minigpt4.data.pipeline import read_errors, source_unit_hash
    from minigpt4.data.sources import iter_units, load_features_file
    from minigpt4.images import load_image, preprocess
    from minigpt4.weights import load_pretrained

    s = features.summary
    assert s["images_encoded"] == shards.rows and s["units_written"] == 4 and s["units_skipped_as_done"] == 0
    assert s["errors"] == {"corrupt": 1} and s["feature_shape"] == [4, 32] and s["dtype"] == "float32"
    assert [(e["key"], e["reason"]) for e in read_errors(features.path + "_errors")] == [(shards.bad_key, "corrupt")]
    manifest = json.loads(uio.read_bytes(features.path + "_manifest.json"))
    assert {k: manifest[k] for k in ("kind", "model", "num_query_tokens", "hidden_size", "image_size", "dtype",
                                     "random_init")} == {
        "kind": "minigpt4-image-features", "model": "tiny", "num_query_tokens": 4, "hidden_size": 32,
        "image_size": 32, "dtype": "float32", "random_init": {"seed": 42, "device": "cpu"}}
    assert manifest["weights"] == {"eva_vit": None, "blip2": None, "hf_blip2": None, "minigpt4": None}
    assert manifest["source"]["format"] == "webdataset" and manifest["encoder"]["num_query_tokens"] == 4

    # one file per source unit, named in the input's order; keys and raw captions as the shard holds them
    units = list(iter_units(fjob.FeaturesConfig(input=shards.pattern).source()))
    files = _files(features.path + "data/")
    assert [f.rsplit("/", 1)[-1] for f in files] == [
        f"{i:08d}-{source_unit_hash('input', u['id'])}.npz" for i, u in enumerate(units)]
    tiny = preset("tiny")
    torch.manual_seed(42)  # the job's seed: the same random encoder
    model, _, _ = load_pretrained(tiny, fjob.WeightsConfig())
    for i, uri in enumerate(files):
        feats, meta = load_features_file(uio.read_bytes(uri))
        n = GOOD_IN_LAST if i == 3 else SHARD_ROWS
        want_keys = [f"{i:05d}{j:04d}" for j in range(n + (i == 3)) if f"{i:05d}{j:04d}" != shards.bad_key]
        assert feats.shape == (n, 4, 32) and feats.dtype == np.float32 and meta["keys"] == want_keys
        if i == 3:
            assert meta["captions"] == [f"a shape number {j}" for j in (0, 1, 3, 4, 5)]
            with tarfile.open(fileobj=io.BytesIO(uio.read_bytes(units[3]["uri"]))) as tar:
                jpegs = {m.name[:-4]: tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")}
            pixels = torch.from_numpy(np.stack([preprocess(load_image(jpegs[k]), 32) for k in meta["keys"]]))
            with torch.no_grad():
                torch.testing.assert_close(torch.from_numpy(feats), model.image_features(pixels), atol=1e-6, rtol=0)

    # a rerun finds every unit done: no actor, no model, nothing written
    lines: list[str] = []
    again = fjob.run(_features_job(shards.pattern, features.path), say=lines.append)
    assert again["images_encoded"] == 0 and again["units_skipped_as_done"] == 4 and again["wall_seconds"] == 0
    assert "nothing to encode" in lines[-1] and _files(features.path + "data/") == files
    # other settings are refused rather than mixed into the same output
    with pytest.raises(ValueError, match=r"holds features of a different job \(dtype differ\)"):
        fjob.run(_features_job(shards.pattern, features.path, dtype="float16"))
    # a killed run's unfinished unit (file and marker missing) is encoded again, and only it
    victim = files[1]
    uio.remove_prefix(victim, exact=True)
    uio.remove_prefix(features.path + f"_done/{victim.rsplit('-', 1)[1][:-4]}.json", exact=True)
    again = fjob.run(_features_job(shards.pattern, features.path), say=lines.append)
    assert again["units_written"] == 1 and again["images_encoded"] == SHARD_ROWS
    assert again["units_skipped_as_done"] == 3 and _files(features.path + "data/") == files


def test_feature_encoder_stores_float16_close_to_float32(tiny_model):
    """The actor on its own: float16 storage (the default) rounds the fp32 features; placeholder rows
    (units without a good image) get zero features and keep their markers."""
    from minigpt4.config import to_dict
    from minigpt4.features import FeatureEncoder

    torch.manual_seed(3)
    pixels = torch.randn(3, 3, 32, 32).numpy()
    batch = {"key": np.array(["a", "b", ""], object), "caption": np.array(["x", "y", ""], object),
             "unit": np.array(["u", "u", "v"], object), "unit_index": np.array([0, 0, 1]),
             "unit_row": np.array([0, 1, -1]), "unit_rows": np.array([-1, 2, 0]), "pixel_values": pixels}
    encoders = {dtype: FeatureEncoder(to_dict(_features_job("unused", "unused", dtype=dtype)))
                for dtype in ("float16", "float32")}
    half, full = (encoders[d](batch) for d in ("float16", "float32"))
    assert half["image_feats"].dtype == np.float16 and full["image_feats"].dtype == np.float32
    assert half["image_feats"].shape == (3, 4, 32) and not half["image_feats"][2].any()
    np.testing.assert_allclose(half["image_feats"], full["image_feats"], rtol=1e-3, atol=1e-3)
    assert not np.array_equal(half["image_feats"], full["image_feats"])
    assert list(half["unit_rows"]) == [-1, 2, 0] and "pixel_values" not in half
    with torch.no_grad():  # both actors build the encoder of seed 42, as training does
        torch.manual_seed(42)
        want = build_model(preset("tiny")).image_features(torch.from_numpy(pixels[:2]))
    torch.testing.assert_close(torch.from_numpy(full["image_feats"][:2]), want, atol=1e-6, rtol=0)


# -- training from features --------------------------------------------------------------------------
def _train_job(path: str, storage: Path, model=None, **train):
    from minigpt4.config import from_dict
    from minigpt4.train import JobConfig

    t = dict(stage=1, num_workers=1, cpus_per_worker=0.5, batch_size=8, epochs=1, iters_per_epoch=3,
             init_lr=1e-3, min_lr=1e-4, warmup_lr=1e-3, warmup_steps=1, precision="fp32", zero_stage=2,
             checkpoint_every=3, log_every=1, storage_path=str(storage), max_failures=0)
    return from_dict(JobConfig, {
        "model": model or {"preset": "tiny"}, "train": {**t, **train},
        "data": {"sources": [{"path": path, "format": "features", "name": "feats"}], "shuffle_seed": None,
                 "concurrency": 1, "rows_per_block": 8, "errors": str(storage / "errors")}})


def test_stage1_trains_from_features_with_the_pixel_paths_first_loss(shards, features, tmp_path):
    from safetensors.torch import load_file

    from minigpt4.data.process import ProcessConfig, Processor
    from minigpt4.data.sources import RawSample
    from minigpt4.prompts import collate_training
    from minigpt4.train import run

    result = run(_train_job(features.path, tmp_path))
    with result.checkpoint.as_directory() as d:
        state = json.loads(Path(d, "state.json").read_text())
        weights = load_file(str(Path(d, "trainable.safetensors")))
    assert state["step"] == 3 and sorted(weights) == ["llama_proj.bias", "llama_proj.weight"]  # only what trains
    history = state["history"]
    assert [h["step"] for h in history] == [1, 2, 3] and all(h["samples_per_s"] > 0 for h in history)
    # the workers never held the encoder the features stand for
    assert "the ViT and Q-Former are not loaded" in (tmp_path / "pretrain" / "progress.log").read_text()

    # the pixel path on the same first batch (shard 0's first 8 images, in order: one unit at a time, no
    # shuffling), with the model train.run builds (seed 42): the same loss
    with tarfile.open(fileobj=io.BytesIO(uio.read_bytes("s3://feature-data/syn/pretrain/00000.tar"))) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
    processor = Processor(ProcessConfig(task="stage1", image_size=32, num_image_tokens=4))
    rows = [processor(RawSample(f"00000{j:04d}", members[f"00000{j:04d}.jpg"],
                                members[f"00000{j:04d}.txt"].decode())) for j in range(8)]
    batch = collate_training(rows, processor.tokenizer.pad_token_id)
    torch.manual_seed(42)
    model = build_model(preset("tiny"))
    model.set_trainable()
    model.train()
    loss = model(**batch, pixel_values=torch.from_numpy(np.stack([r["pixel_values"] for r in rows]))).loss
    assert history[0]["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert not torch.equal(weights["llama_proj.weight"], model.llama_proj.weight.detach())  # it trained


def test_dropped_encoder_frees_the_frozen_parts_and_keeps_the_feature_path():
    torch.manual_seed(0)
    model = build_model(preset("tiny")).eval()
    ids = torch.tensor([[1] + [-200] * 4 + [300, 301, 302]])
    feats = torch.randn(1, 4, 32)
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids.masked_fill(ids < 0, -100))
    before = model(**batch, image_feats=feats).loss
    counts = model.parameter_counts()
    assert model.drop_encoder() == counts["vision"] + counts["qformer"] > 0
    after = model.parameter_counts()
    assert after["vision"] == after["qformer"] == 0 and after["llm"] == counts["llm"]
    assert model.num_parameters() == counts["total"] - counts["vision"] - counts["qformer"]
    assert torch.equal(model(**batch, image_feats=feats).loss, before)
    with pytest.raises(ValueError, match="dropped .*give image_feats"):
        model(**batch, pixel_values=torch.randn(1, 3, 32, 32))
    model.train()  # frozen parts' eval mode does not trip on the stand-ins
    with pytest.raises(ValueError, match="frozen encoder"):
        build_model(preset("tiny", train_vision=True)).drop_encoder()


def test_training_refuses_features_of_another_encoder_before_any_work(features, tmp_path):
    from minigpt4.train import prepare_job, run

    with pytest.raises(ValueError, match=r"another encoder.*weights\.blip2 \(features: none; this job: "
                                         r"s3://feature-data/blip2\.pth\)"):
        run(_with_weights(_train_job(features.path, tmp_path), blip2="s3://feature-data/blip2.pth"))
    with pytest.raises(ValueError, match=r"random init .*features: \{'seed': 42.*this job: \{'seed': 7"):
        prepare_job(_train_job(features.path, tmp_path, seed=7), stage=1)
    with pytest.raises(ValueError, match=r"encoder architecture \(features: preset tiny with 4 x 32"):
        run(_train_job(features.path, tmp_path, model={"preset": "tiny", "num_query_tokens": 8}))
    with pytest.raises(ValueError, match="frozen encoder, but model.train_vision is on"):
        run(_train_job(features.path, tmp_path, model={"preset": "tiny", "train_vision": True}))
    with pytest.raises(ValueError, match="no readable _manifest.json"):
        run(_train_job("s3://feature-data/syn/pretrain/", tmp_path))
    assert not (tmp_path / "pretrain").exists()  # nothing started


def _with_weights(job, **weights):
    for k, v in weights.items():
        setattr(job.weights, k, v)
    return job


def test_features_config_file_is_a_valid_job():
    import yaml

    from minigpt4.config import from_dict
    from minigpt4.features import FeaturesConfig

    path = Path(__file__).resolve().parents[1] / "jobs/configs/features_vicuna7b.yaml"
    assert path.read_text().splitlines()[0] == ("# python jobs/features.py --config jobs/configs/features_vicuna7b.yaml "
                                                "[key=value ...]")
    cfg = from_dict(FeaturesConfig, yaml.safe_load(path.read_text()))
    model = cfg.model_config(gpu=True)
    assert (model.num_query_tokens, model.proj_in_features, model.vision_dtype) == (32, 768, "bf16")
    assert cfg.source().format == "webdataset" and cfg.dtype == "float16"
