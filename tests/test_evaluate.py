"""Caption evaluation (jobs/evaluate.py, minigpt4.evaluate): the job end to end on the session's Ray
cluster and the local S3 server, its numbers equal to minigpt4.metrics on the captions it wrote, resume,
COCO-format annotations with key matching and counted leftovers, CHAIR on hand-written captions of
synthetic scenes, and clear errors for bad annotation files."""
from __future__ import annotations

import io
import json

import pytest

from minigpt4.data import io as uio

HELDOUT = 6
UNIT = 3


def _cfg(**kw):
    from minigpt4.evaluate import EvaluateConfig
    from minigpt4.generate import SamplingParams

    base = dict(unit_size=UNIT, batch_size=4, sampling=SamplingParams(max_new_tokens=8), concurrency=[1],
                preprocess_cpus=0.5, cpus_per_actor=0.5, log_every=1.0)
    return EvaluateConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def heldout(s3_endpoint):
    """A 6-scene synthetic held-out split (no training data) on the local S3 server."""
    import boto3

    from minigpt4.synthetic import write_dataset

    boto3.client("s3").create_bucket(Bucket="eval-input")
    root = "s3://eval-input/synthetic"
    write_dataset(root, train_shards=0, align_samples=0, heldout_samples=HELDOUT, image_size=32, progress=False)
    return root


def _direct(output: str, annotations: dict) -> dict:
    """BLEU, CIDEr-D and CHAIR of a prompt's written captions, computed with metrics.py alone."""
    from minigpt4.caption import read_captions
    from minigpt4.metrics import bleu, chair, cider_d, synthetic_objects, synthetic_vocabulary, tokenize

    caps = {r["key"].rsplit(".", 1)[0]: r["caption"] for r in read_captions(output)}
    refs = {}
    for a in annotations["annotations"]:
        refs.setdefault(a["image_id"], []).append(a["caption"])
    c = chair(caps, synthetic_objects(annotations), synthetic_vocabulary())
    return {**bleu(caps, refs), "cider_d": cider_d(caps, refs)["cider_d"], "chair_i": c["chair_i"],
            "chair_s": c["chair_s"], "chair_recall": c["recall"], "images": len(caps),
            "words_per_caption": sum(len(tokenize(t)) for t in caps.values()) / len(caps),
            "objects_per_caption": c["mentions"] / len(caps)}


def test_evaluate_synthetic_end_to_end_equals_metrics_and_resumes(ray_cluster, heldout, s3_bucket):
    from PIL import Image

    from minigpt4 import evaluate
    from minigpt4.evaluate import PAPER_PROMPTS

    out = f"s3://{s3_bucket}/eval"
    cfg = _cfg(input=f"{heldout}/heldout/images/", annotations=f"{heldout}/heldout/annotations.json", output=out)
    lines = []
    report = evaluate.run(cfg, say=lines.append)
    assert list(report["prompts"]) == ["long", "short"] and report["kind"] == "synthetic"
    assert report["vocabulary"] == "synthetic" and report["weights"] == "random" and report["model"] == "tiny"
    assert report["images_annotated"] == HELDOUT and "shapes" in report["chair_ground_truth"]
    annotations = json.loads(uio.read_bytes(f"{heldout}/heldout/annotations.json"))
    for name, p in report["prompts"].items():
        assert p["prompt"] == PAPER_PROMPTS[name] and p["output"] == f"{out}/{name}"
        assert p["matching"] == {"captions": HELDOUT, "scored": HELDOUT, "unannotated": 0, "unannotated_examples": [],
                                 "repeated_image": 0, "repeated_image_examples": [], "uncaptioned": 0,
                                 "uncaptioned_examples": [], "uncaptioned_bad_images": 0}
        assert p["caption_job"]["images_captioned"] == HELDOUT and p["caption_job"]["errors_total"] == 0
        want = _direct(p["output"], annotations)
        assert {k: p[k] for k in want} == pytest.approx(want)
        assert p["chair_counts"]["captions"] == HELDOUT and len(p["examples"]) == 3
    assert any("prompt 2/2 'short'" in line for line in lines) and any("scoring 'long'" in line for line in lines)
    assert "CHAIR-i" in report["verdict"]  # random weights name no shape, or some

    # the files: the report as written, a markdown table row per prompt, a PNG, one row per prompt and image
    assert json.loads(uio.read_bytes(f"{out}/report.json")) == json.loads(json.dumps(report))
    md = uio.read_bytes(f"{out}/report.md").decode()
    assert "| long | 6 |" in md and "| short | 6 |" in md and "**random**" in md and PAPER_PROMPTS["short"] in md
    assert Image.open(io.BytesIO(uio.read_bytes(f"{out}/report.png"))).size == (760, 320)
    rows = [json.loads(x) for x in uio.read_bytes(f"{out}/per_image.jsonl").decode().splitlines()]
    assert len(rows) == 2 * HELDOUT and {r["prompt"] for r in rows} == {"long", "short"}
    assert rows[0]["key"] == "h000000.jpg" and rows[0]["image_id"] == "h000000"

    # a rerun resumes: every unit of both prompts is skipped, nothing is captioned again, the scores stand
    again = evaluate.run(cfg, say=lines.append)
    for name, p in again["prompts"].items():
        assert p["caption_job"]["images_captioned"] == 0
        assert p["caption_job"]["units_skipped_as_done"] == HELDOUT // UNIT
        assert {k: p[k] for k in ("bleu_4", "cider_d", "chair_i", "chair_s")} == \
            {k: report["prompts"][name][k] for k in ("bleu_4", "cider_d", "chair_i", "chair_s")}


def _png(path, colour=(200, 30, 30)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), colour).save(path, "PNG")


def test_evaluate_coco_format_matches_keys_and_counts_leftovers(ray_cluster, tmp_path):
    """Keys match by COCO number, stem or file name; an image without annotation, an annotated image
    with no file, a bad image and a second file of one image are counted; CHAIR's ground truth is the
    instance categories plus what the references name."""
    from minigpt4 import evaluate
    from minigpt4.metrics import bleu, chair, coco_vocabulary

    images = tmp_path / "images"
    for name in ("COCO_val2014_000000000042.png", "000000000042.png", "000000000007.png", "sub/cat.png",
                 "unlisted.png"):
        _png(images / name)
    (images / "COCO_val2014_000000000013.png").write_bytes(b"\x89PNG broken")
    refs = {42: ["a dog lying on a couch"], 7: ["a man holding an umbrella", "a person in the rain"],
            9: ["a cat on a bed"], 5: ["a pizza"], 13: ["a bus on a street"]}
    captions = {"images": [{"id": 42, "file_name": "COCO_val2014_000000000042.jpg"}, {"id": 7},
                           {"id": 9, "file_name": "sub/cat.png"},
                           {"id": 5, "file_name": "COCO_val2014_000000000005.jpg"},
                           {"id": 13, "file_name": "COCO_val2014_000000000013.jpg"}],
                "annotations": [{"image_id": i, "caption": c} for i, cs in refs.items() for c in cs]}
    instances = {"categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 62, "name": "chair"}],
                 "annotations": [{"image_id": 42, "category_id": 18}, {"image_id": 7, "category_id": 1},
                                 {"image_id": 999, "category_id": 62}]}  # an image outside the captions file
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    out = tmp_path / "eval"
    cfg = _cfg(input=str(images), annotations=str(tmp_path / "captions.json"),
               instances=str(tmp_path / "instances.json"), output=str(out), prompts={"short": "Describe briefly."})
    report = evaluate.run(cfg, say=lambda _: None)
    assert report["kind"] == "coco" and report["vocabulary"] == "coco"
    p = report["prompts"]["short"]
    assert p["matching"] == {"captions": 5, "scored": 3, "unannotated": 1, "unannotated_examples": ["unlisted.png"],
                             "repeated_image": 1, "repeated_image_examples": ["COCO_val2014_000000000042.png"],
                             "uncaptioned": 2, "uncaptioned_examples": ["13", "5"], "uncaptioned_bad_images": 1}
    assert p["caption_job"]["errors_total"] == 1
    rows = {r["image_id"]: r for r in map(json.loads, (out / "per_image.jsonl").read_text().splitlines())}
    assert {k: r["key"] for k, r in rows.items()} == {"42": "000000000042.png", "7": "000000000007.png",
                                                      "9": "sub/cat.png"}
    caps = {k: r["caption"] for k, r in rows.items()}
    truth = {"42": {"dog", "couch"}, "7": {"person", "umbrella"}, "9": {"cat", "bed"}}
    want = chair(caps, truth, coco_vocabulary())
    assert (p["chair_i"], p["chair_s"], p["chair_recall"]) == pytest.approx((want["chair_i"], want["chair_s"],
                                                                            want["recall"]))
    assert p["bleu_4"] == pytest.approx(bleu(caps, {str(k): v for k, v in refs.items() if str(k) in caps})["bleu_4"])
    assert "| short | 3 |" in (out / "report.md").read_text() and report["verdict"] is None


def test_chair_on_hand_written_captions_of_synthetic_scenes(tmp_path):
    """The scoring alone, on captions whose hallucinations are known: the scenes' shapes are exact."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from minigpt4.evaluate import evaluate_prompt, ground_truth, load_annotations, load_vocabulary
    from minigpt4.synthetic import SHAPES, write_dataset

    write_dataset(str(tmp_path / "syn"), train_shards=0, align_samples=0, heldout_samples=4, image_size=16,
                  shapes=1, progress=False)
    ann = load_annotations(str(tmp_path / "syn/heldout/annotations.json"))
    shape = {k: next(iter(v)) for k, v in ann.objects.items()}
    other = {k: next(s for s in SHAPES if s != v) for k, v in shape.items()}
    caps = {"h000000.jpg": f"a red {shape['h000000']}",                                 # right
            "h000001.jpg": f"a big {other['h000001']}",                                 # wrong
            "h000002.jpg": f"a {shape['h000002']}, a {shape['h000002']} and a {other['h000002']}",  # 2 right, 1 wrong
            "h000003.jpg": "nothing to see",                                            # no object
            "stray.jpg": f"a {shape['h000000']}"}                                       # no annotation
    (tmp_path / "caps/data").mkdir(parents=True)
    pq.write_table(pa.table({"key": list(caps), "caption": list(caps.values())}), tmp_path / "caps/data/u.parquet")
    name, vocab = load_vocabulary("auto", ann.kind)
    m, rows = evaluate_prompt(str(tmp_path / "caps"), ann, vocab, ground_truth(ann, vocab))
    assert name == "synthetic" and m["images"] == 4
    assert m["chair_i"] == pytest.approx(2 / 5) and m["chair_s"] == pytest.approx(2 / 4)  # mentions 1+1+3+0
    assert m["chair_recall"] == pytest.approx(2 / 4) and m["objects_per_caption"] == pytest.approx(5 / 4)
    assert m["matching"]["unannotated_examples"] == ["stray.jpg"] and m["matching"]["uncaptioned"] == 0
    assert [r["hallucinated"] for r in rows] == [[], [other["h000001"]], [other["h000002"]], []]


def test_verdict_compares_the_papers_two_prompts():
    from minigpt4.evaluate import verdict

    def report(long_i, short_i, mentions=(10, 4)):
        return {"prompts": {n: {"chair_i": c, "words_per_caption": w, "chair_counts": {"mentions": m}}
                            for n, c, w, m in (("long", long_i, 80.0, mentions[0]), ("short", short_i, 12.0,
                                                                                      mentions[1]))}}

    assert verdict(report(0.2, 0.05)).startswith("CHAIR-i is 5.0% under the short prompt, lower than 20.0%")
    assert "finding (shorter answers hallucinate less) holds" in verdict(report(0.2, 0.05))
    assert "higher than" in verdict(report(0.05, 0.2)) and "does not hold" in verdict(report(0.05, 0.2))
    assert "short prompt's captions name no object" in verdict(report(0.1, 0.0, mentions=(10, 0)))
    assert verdict({"prompts": {"long": report(0.1, 0.1)["prompts"]["long"]}}) is None


def _write(path, obj) -> str:
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


GOOD_IMAGES = [{"id": 1, "file_name": "a.jpg"}]
GOOD_CAPTIONS = [{"image_id": 1, "caption": "a dog"}]


@pytest.mark.parametrize("captions, instances, message", [
    (None, None, "no such file"),
    ("{not json", None, "not valid JSON"),
    ([1, 2], None, "holds a JSON list"),
    ({"images": GOOD_IMAGES}, None, "no 'annotations' list"),
    ({"images": GOOD_IMAGES, "annotations": [{"image_id": 1}]}, None, r"annotations\[0\] needs image_id, caption"),
    ({"images": GOOD_IMAGES, "annotations": [{"image_id": 2, "caption": "x"}]}, None, "which `images` does not list"),
    ({"images": GOOD_IMAGES + [{"id": 3}], "annotations": GOOD_CAPTIONS}, None, "1 images have no reference caption"),
    ({"images": GOOD_IMAGES, "annotations": GOOD_CAPTIONS}, {"annotations": []}, "no 'categories' list"),
    ({"images": GOOD_IMAGES, "annotations": GOOD_CAPTIONS},
     {"categories": [{"id": 1, "name": "dog"}], "annotations": [{"image_id": 1, "category_id": 5}]},
     "category_id 5, not in `categories`"),
])
def test_malformed_annotations_are_clear_errors(tmp_path, captions, instances, message):
    from minigpt4.evaluate import load_annotations

    path = str(tmp_path / "captions.json") if captions is None else _write(tmp_path / "captions.json", captions)
    inst = _write(tmp_path / "instances.json", instances) if instances is not None else None
    with pytest.raises(ValueError, match=message) as err:
        load_annotations(path, inst)
    assert (inst if instances is not None else path) in str(err.value)


def test_cli_checks_annotations_vocabulary_and_config_before_ray(tmp_path, capsys):
    """Bad input fails in one line with exit code 2, before a Ray cluster starts."""
    from minigpt4.evaluate import main

    captions = _write(tmp_path / "captions.json", {"images": GOOD_IMAGES, "annotations": GOOD_CAPTIONS})
    unicorn = _write(tmp_path / "instances.json", {"categories": [{"id": 1, "name": "unicorn"}],
                                                   "annotations": [{"image_id": 1, "category_id": 1}]})
    base = ["--input", str(tmp_path), "--output", str(tmp_path / "out")]
    for argv, msg in ((["--annotations", str(tmp_path / "nope.json")], "nope.json: no such file"),
                      (["--annotations", captions, "--instances", unicorn], "vocabulary does not name: ['unicorn']"),
                      (["--annotations", captions, "prompts={'a b': x}"], "prompt name 'a b'"),
                      (["--annotations", captions, "vocabulary=klingon"], "vocabulary must be one of"),
                      (["--annotations", captions, "batch_size=0"], "batch_size must be >= 1")):
        assert main(base + argv) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, err
