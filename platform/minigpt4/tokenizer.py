"""Tokenizers: the LLaMA/Vicuna tokenizer from a model directory, and the tiny one for tests.

The tiny tokenizer behaves like LLaMA's where MiniGPT-4 depends on it: ids 0/1/2 are
`<unk>`/`<s>`/`</s>`, 256 byte-fallback pieces follow, every separately tokenized segment gets
its own leading `▁`, `add_special_tokens=True` prepends BOS only, and `$$` (MiniGPT-4's pad
token) is an ordinary piece. It is trained once by `build_tiny_tokenizer()` on a fixed corpus
and shipped in `assets/tiny_tokenizer/` so every machine gets identical ids.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

TINY_TOKENIZER_DIR = Path(__file__).parent / "assets" / "tiny_tokenizer"
PAD_TOKEN = "$$"  # MiniGPT-4 sets this at load time; it is not stored in the tokenizer files

# Words of the synthetic scene world (data issue), the prompt templates and the chat system
# prompt, so that a tiny model can learn captions in a few hundred steps.
_COLOURS = "red green blue yellow purple orange white black gray pink brown cyan"
_SHAPES = "circle circles square squares triangle triangles star stars rectangle rectangles diamond diamonds cross crosses ellipse ellipses"
_WORDS = (
    "a an the one two three four five and of on in at to is are there this that with image picture "
    "photo shows showing above below left right next beside near top bottom middle center corner "
    "background large small big tiny medium sized shape shapes colour colored dark light bright "
    "it its them they their scene contains containing placed drawn plain solid each other "
    "Human Assistant Give following ImageContent Img ImageHere You will be able see once I "
    "provide you Please answer my questions Describe describe detail detailed Take look notice "
    "what description Could contents for me INST Continue as many details possible Say everything "
    "shortly precisely less than words sorry apologize made mistake"
)


def _corpus() -> list[str]:
    lines = [
        "Give the following image: <Img>ImageContent</Img>. You will be able to see the image "
        "once I provide it to you. Please answer my questions.###Human: <Img><ImageHere></Img> "
        "Describe this image in detail.###Assistant: a red circle above a blue square.###",
        "<Img><ImageHere></Img> Take a look at this image and describe what you notice.",
        "<Img><ImageHere></Img> Please provide a detailed description of the picture.",
        "<Img><ImageHere></Img> Could you describe the contents of this image for me?",
        "[INST] <Img><ImageHere></Img> Describe this image. [/INST] ",
        "###Human: Continue ###Assistant: ###",
        "x$$ y$$ $$ $$",
    ]
    words = (_COLOURS + " " + _SHAPES + " " + _WORDS).split()
    for c in _COLOURS.split():
        for s in _SHAPES.split():
            lines.append(f"a {c} {s} above a {c} {s}. the {s} is {c}, on the left of the picture.")
    lines += [" ".join(words)] * 3
    return lines


def build_tiny_tokenizer(vocab_size: int = 640):
    """Train the tiny BPE tokenizer (deterministic) and wrap it as a transformers tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    byte_pieces = [f"<0x{i:02X}>" for i in range(256)]
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(byte_pieces), special_tokens=specials,
                                  show_progress=False)
    trainer_tok.train_from_iterator(_corpus(), trainer=trainer)
    # Re-number LLaMA style: specials 0..2, bytes 3..258, then learned pieces.
    vocab = {t: i for i, t in enumerate(specials + byte_pieces)}
    for piece, _ in sorted(trainer_tok.get_vocab().items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, (list, tuple)) else tuple(m.split(" "))
              for m in json.loads(trainer_tok.to_str())["model"]["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1, right=0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   padding_side="right", model_max_length=4096)


def load_tokenizer(path: str | os.PathLike | None = None):
    """Load a tokenizer directory (local; s3:// is resolved by `weights.resolve`) with pad = `$$`.

    `None` gives the tiny tokenizer. The pad token is set here, as MiniGPT-4 does, and must be a
    single existing piece: a pad that maps to `<unk>` would silently mask real tokens.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path or TINY_TOKENIZER_DIR))
    tok.pad_token = PAD_TOKEN
    if tok.pad_token_id is None or tok.pad_token_id == tok.unk_token_id:
        raise ValueError(f"tokenizer at {path or TINY_TOKENIZER_DIR} has no single piece for the pad token {PAD_TOKEN!r}")
    if tok.bos_token_id is None or tok.eos_token_id is None:
        raise ValueError(f"tokenizer at {path or TINY_TOKENIZER_DIR} lacks a BOS or EOS token")
    return tok


def write_widened_tokenizer(directory: str | os.PathLike, vocab_size: int) -> str:
    """Write the tiny tokenizer widened to `vocab_size` ids into `directory` (returned, for load_tokenizer or
    `weights.tokenizer`): for random-weight models at a real vocabulary (the benchmarks' 32,000 ids).

    The tiny tokenizer decodes ids past its 640 to nothing, so such a model's text (and the
    detokenization, stop-string and streaming work on it) would be empty. Here every added id is one
    ordinary piece of 2-3 syllables, most with a leading `▁` as LLaMA's are, so any sampled id reads as a
    few letters; no merge reaches them, so text encodes exactly as with the tiny tokenizer."""
    import shutil

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(TINY_TOKENIZER_DIR / "tokenizer_config.json", out / "tokenizer_config.json")
    spec = json.loads((TINY_TOKENIZER_DIR / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    n = len(syllables)
    i = 0
    while len(vocab) < vocab_size:
        piece = syllables[i % n] + syllables[i // n % n] + (syllables[i // n // n % n] if i >= n * n else "")
        if i >= n ** 3:
            piece += str(i // n ** 3)
        piece = piece if i % 4 == 3 else "▁" + piece
        i += 1
        vocab.setdefault(piece, len(vocab))
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    return str(out)


if __name__ == "__main__":  # regenerate the shipped asset: python -m minigpt4.tokenizer
    t = build_tiny_tokenizer()
    t.save_pretrained(TINY_TOKENIZER_DIR)
    print(f"wrote {TINY_TOKENIZER_DIR} (vocab {len(t)})")
