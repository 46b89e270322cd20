"""`python -m minigpt4`: chat, caption, demo, and clear errors for bad input."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli_error

from minigpt4.__main__ import main
from minigpt4.synthetic import Scene, Shape, render


@pytest.fixture
def image_path(tmp_path):
    path = tmp_path / "scene.png"
    render(Scene((Shape("red", "circle", 0.3, 0.3, 0.15), Shape("blue", "square", 0.7, 0.7, 0.15)))).save(path)
    return path


def _run(*args):
    return subprocess.run([sys.executable, "-m", "minigpt4", *map(str, args)], capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)


def test_chat_two_turns_streams_answers(image_path):
    out = _run("chat", "--image", image_path, "--ask", "Describe this image.", "--ask", "And the colours?",
               "--max-new-tokens", "6", "--greedy")
    assert out.returncode == 0, out.stderr
    turns = [l for l in out.stdout.splitlines() if l.startswith("Human: ")]
    assert turns == ["Human: Describe this image.", "Human: And the colours?"]
    assert out.stdout.count("Assistant: ") == 2


def test_chat_reads_questions_from_stdin(image_path, capsys, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("What is it?\n/reset\nAgain?\n/quit\nnot asked\n"))
    assert main(["chat", "--image", str(image_path), "--max-new-tokens", "4", "--greedy"]) == 0
    text = capsys.readouterr().out
    assert "Human: What is it?" in text and "Human: Again?" in text and "restarted" in text
    assert "not asked" not in text


def test_caption_skips_bad_images_and_reports_them(image_path, tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rc = main(["caption", str(image_path), str(bad), str(tmp_path / "missing.png"), "--greedy", "--max-new-tokens", "4"])
    captured = capsys.readouterr()
    assert rc == 0
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{image_path}\t")
    assert "broken.jpg\tERROR (corrupt)" in captured.err
    assert "missing.png\tERROR (missing)" in captured.err


def test_missing_image_and_weights_are_one_line_errors(image_path, tmp_path, capsys):
    assert "image not found" in cli_error(capsys, main(["chat", "--image", str(tmp_path / "nope.jpg"), "--ask", "hi"]))
    assert "pretrained_minigpt4_7b.pth" in cli_error(capsys, main(
        ["chat", "--image", str(image_path), "--ask", "hi", "--weights", str(tmp_path / "pretrained_minigpt4_7b.pth")]))


def test_every_job_script_runs_as_a_script():
    """Each jobs/*.py as `python jobs/X.py --help` runs it (the command `ray job submit` is given): run as
    __main__, its imports and argument parser work. One interpreter runs them all (runpy), not one each."""
    root = Path(__file__).resolve().parents[1]
    code = ("import contextlib, glob, io, runpy, sys\n"
            "for path in sorted(glob.glob('jobs/*.py')):\n"
            "    sys.argv, out = [path, '--help'], io.StringIO()\n"
            "    try:\n"
            "        with contextlib.redirect_stdout(out):\n"
            "            runpy.run_path(path, run_name='__main__')\n"
            "    except SystemExit as e:\n"
            "        print(path, e.code, out.getvalue().split()[:2])\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    scripts = sorted(p.name for p in (root / "jobs").glob("*.py"))
    assert len(scripts) >= 8 and r.stdout.splitlines() == [
        f"jobs/{name} 0 ['usage:', '{name}']" for name in scripts], r.stdout + r.stderr[-2000:]


def test_demo_runs_end_to_end(tmp_path):
    """What `make demo` runs, shortened to 12 steps per stage (the full learning proof takes minutes:
    `make demo`): its own local S3 server and Ray cluster (a subprocess: this session's cluster and
    S3 fixtures must not be shared with it), both stages on Ray Train, accuracy before and after."""
    import json

    out = _run("demo", "--quick", "--output", tmp_path / "demo", "--max-new-tokens", "5")
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    for needle in ("stage 1: 512 captions, stage 2: 512 descriptions, held out: 100", "[demo]   before training",
                   "[demo] stage 1: 12 steps x 128 samples on Ray Train + DeepSpeed", "  [train] step 12",
                   "[demo]   after stage 1", "[demo]   after stage 2", "training + evaluation took",
                   "data: 512 samples delivered, 0 skipped", "[demo] chat about held-out image h000000", "[demo] done"):
        assert needle in text, needle
    assert text.count("Assistant: ") == 2 and "Traceback" not in out.stderr
    report = json.loads((tmp_path / "demo" / "demo_report.json").read_text())
    assert set(report["scores"]) == {"before", "after stage 1", "after stage 2"}
    assert report["scores"]["before"]["images"] == 100 and report["scores"]["before"]["accuracy"] <= 0.3
    for stage in ("pretrain", "finetune"):
        assert (tmp_path / "demo" / stage / "curves.png").exists()
        assert (tmp_path / "demo" / stage / "progress.log").read_text().count("[train] step") == 3


def test_chat_compiles_before_the_first_question(image_path, tiny_model, tiny_tokenizer, monkeypatch, capsys):
    """Where the decode step compiles (CUDA; here forced, with a compile-counting backend), the chat does it
    at start with a word on stderr, and answering compiles nothing more; with beams (the simple path) or
    where nothing compiles (CPU), no warm-up."""
    import io

    import minigpt4.generate as generate
    from minigpt4.__main__ import Chat
    from minigpt4.generate import SamplingParams

    graphs = []
    monkeypatch.setattr(generate, "COMPILE_OPTIONS",
                        dict(backend=lambda gm, inputs: graphs.append(gm) or gm.forward, fullgraph=True))
    params = SamplingParams(max_new_tokens=8, stop=("###",))
    chat = Chat(tiny_model, tiny_tokenizer, params, out=io.StringIO(), compile=True)
    assert "compiling the decode step" in capsys.readouterr().err and chat.engine._cache.capacity == 512
    compiled = len(graphs)
    assert compiled >= 1
    chat.upload(image_path)
    chat.ask("Describe this image.")
    chat.ask("And the colours?")
    assert len(graphs) == compiled
    for quiet in (Chat(tiny_model, tiny_tokenizer, params, out=io.StringIO()),  # CPU: nothing compiles
                  Chat(tiny_model, tiny_tokenizer, SamplingParams(num_beams=2), out=io.StringIO(), compile=True)):
        assert quiet.engine._cache is None
    assert "compiling" not in capsys.readouterr().err


def test_chat_reuses_encoded_image_and_matches_generate(image_path, tiny_model, tiny_tokenizer):
    import io

    from minigpt4.__main__ import Chat
    from minigpt4.generate import SamplingParams
    from minigpt4.images import load_pixels

    params = SamplingParams(max_new_tokens=6, stop=("###",))
    chat = Chat(tiny_model, tiny_tokenizer, params, out=io.StringIO())
    chat.upload(image_path)
    assert chat.conv.images[0].shape == (1, tiny_model.cfg.num_query_tokens, 64)  # embeddings, not pixels
    chat.ask("Describe this image.")
    second = chat.ask("And the colours?")
    pixels = load_pixels([image_path], 32)
    conv = chat.conv.copy()
    conv.messages = conv.messages[:-1]  # prompt as it was when the second question was asked
    ref = tiny_model.generate(tiny_tokenizer, [conv.prompt()], [pixels], params)[0]
    assert conv.clean_answer(ref.text) == second
