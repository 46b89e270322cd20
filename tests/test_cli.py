"""`python -m minigpt4`: chat, caption, demo, and clear errors for bad input."""
from __future__ import annotations

import subprocess
import sys

import pytest

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


def test_missing_image_and_weights_are_one_line_errors(image_path, tmp_path):
    out = _run("chat", "--image", tmp_path / "nope.jpg", "--ask", "hi")
    assert out.returncode == 2 and "image not found" in out.stderr and "Traceback" not in out.stderr
    out = _run("chat", "--image", image_path, "--ask", "hi", "--weights", tmp_path / "pretrained_minigpt4_7b.pth")
    assert out.returncode == 2 and "pretrained_minigpt4_7b.pth" in out.stderr and "Traceback" not in out.stderr


def test_demo_runs_end_to_end():
    """What `make demo` runs: its own local S3 server and Ray cluster (a subprocess: this session's
    cluster and S3 fixtures must not be shared with it)."""
    out = _run("demo", "--max-new-tokens", "5")
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "[demo] Ray Data stage1: 512 samples from 8 units" in text and ", 0 skipped" in text
    assert "[demo] Ray Data stage2: 64 samples" in text
    assert "[demo] held-out image h000000: a" in text and text.count("Assistant: ") == 2 and "[demo] done" in text


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
