"""Command line: `python -m minigpt4 {chat,caption,demo}`.

    python -m minigpt4 chat --image photo.jpg                     # tiny preset, random weights
    python -m minigpt4 chat --image photo.jpg --preset vicuna7b \\
        --llm /models/vicuna-7b --eva-vit eva_vit_g.pth \\
        --blip2 blip2_pretrained_flant5xxl.pth --weights s3://bucket/pretrained_minigpt4_7b.pth
    python -m minigpt4 caption a.jpg b.png --greedy
"""
from __future__ import annotations

import argparse
import logging
import sys

from minigpt4.generate import CHAT_DEFAULTS, SamplingParams

log = logging.getLogger("minigpt4")


def _add_model_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("model and weights (local paths or s3:// URIs)")
    g.add_argument("--preset", default="tiny", help="tiny | vicuna7b | vicuna13b | llama2_7b (default: tiny)")
    g.add_argument("--weights", action="append", help="MiniGPT-4 checkpoint with llama_proj (pretrained_minigpt4*.pth "
                   "or a stage's .pth); repeat to load several in order (the demo: stage 1's, then stage 2's)")
    g.add_argument("--llm", help="Vicuna / LLaMA Hugging Face model directory")
    g.add_argument("--eva-vit", help="eva_vit_g.pth (LAVIS)")
    g.add_argument("--blip2", help="blip2_pretrained_flant5xxl.pth (LAVIS) with ln_vision, Q-Former, query tokens")
    g.add_argument("--hf-blip2", help="Hugging Face BLIP-2 checkpoint (vision_model / qformer / query_tokens)")
    g.add_argument("--tokenizer", help="tokenizer directory (default: the --llm directory)")
    g.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="model config override, e.g. --set quantize_llm=8bit --set llm_dtype=bf16")
    s = p.add_argument_group("decoding (MiniGPT-4 demo defaults)")
    s.add_argument("--max-new-tokens", type=int, default=CHAT_DEFAULTS.max_new_tokens)
    s.add_argument("--num-beams", type=int, default=CHAT_DEFAULTS.num_beams)
    s.add_argument("--temperature", type=float, default=CHAT_DEFAULTS.temperature)
    s.add_argument("--top-p", type=float, default=CHAT_DEFAULTS.top_p)
    s.add_argument("--repetition-penalty", type=float, default=CHAT_DEFAULTS.repetition_penalty)
    s.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    s.add_argument("--seed", type=int, default=None)


def load_runtime(args):
    """(model, tokenizer) from CLI args; random weights for parts with no file given."""
    import torch

    from minigpt4.config import apply_overrides, from_dict
    from minigpt4.model import PRESETS, ModelConfig

    if args.preset not in PRESETS:
        raise SystemExit(f"error: unknown preset {args.preset!r}; choose from {sorted(PRESETS)}")
    data = apply_overrides({**PRESETS[args.preset], "name": args.preset}, args.overrides)
    cfg = from_dict(ModelConfig, data)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    from minigpt4.weights import WeightsConfig, load_pretrained

    weights = WeightsConfig(eva_vit=args.eva_vit, blip2=args.blip2, hf_blip2=args.hf_blip2, llm=args.llm,
                            minigpt4=args.weights, tokenizer=args.tokenizer)
    if args.preset != "tiny" and not (args.llm and (args.weights or args.blip2 or args.hf_blip2)):
        log.warning("preset %s without --llm and --weights/--blip2: parts without weights are random", args.preset)
    model, tokenizer, _ = load_pretrained(cfg, weights, device=device)
    return model.eval(), tokenizer


def sampling_from_args(args, stop: tuple[str, ...]) -> SamplingParams:
    return SamplingParams(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, temperature=args.temperature,
                          top_p=args.top_p, repetition_penalty=args.repetition_penalty, do_sample=not args.greedy,
                          length_penalty=CHAT_DEFAULTS.length_penalty, max_length=CHAT_DEFAULTS.max_length,
                          stop=stop, seed=args.seed)


class Chat:
    """Terminal chat over one Conversation: each image is encoded once at upload, answers stream as they decode.

    Where the decode step compiles (a GPU), it does so here, before the first question, with a word on
    stderr: not silently inside the first answer. compile: the engine's (None: on CUDA)."""

    WARMUP_TOKENS = 512  # prompt + answer positions of the cache warmed up; a longer conversation grows it once

    def __init__(self, model, tokenizer, params: SamplingParams, out=sys.stdout, compile: bool | None = None):
        from minigpt4.generate import GenerationEngine

        self.model, self.tokenizer, self.params, self.out = model, tokenizer, params, out
        self.engine = GenerationEngine(model.llm, tokenizer, compile=compile)
        if params.num_beams == 1 and self.engine.compiles(model.device):  # beam search runs the simple path
            print("(compiling the decode step for this device: a minute at 7B, once per start)", file=sys.stderr,
                  flush=True)
            info = self.engine.warmup(slots=1, tokens=self.WARMUP_TOKENS)
            log.info("decode step compiled in %.1fs", info["seconds"])
        self.reset()

    def reset(self):
        from minigpt4.prompts import Conversation

        self.conv = Conversation.for_template(self.model.cfg.template)

    def upload(self, source) -> None:
        import torch

        from minigpt4.images import load_pixels

        pixels = load_pixels([source], self.model.cfg.image_size).to(self.model.device)
        with torch.no_grad():
            self.conv.add_image(self.model.encode_images(pixels))  # (1, N, H), reused by every later turn

    def ask(self, text: str) -> str:
        import torch

        from minigpt4.prompts import tokenize_segments

        self.conv.ask(text)
        images = torch.cat(self.conv.images) if self.conv.images else None
        with torch.no_grad():
            prompt = self.model.prompt_embeds(tokenize_segments(self.tokenizer, self.conv.prompt(), bos=True), images)
        for events in self.engine.stream([prompt], self.params):
            for ev in events:
                if ev.text:
                    self.out.write(ev.text)
                    self.out.flush()
                if ev.completion is not None:
                    answer = self.conv.clean_answer(ev.completion.text)
        self.out.write("\n")
        self.conv.answer(answer)
        return answer


def cmd_chat(args) -> int:
    model, tokenizer = load_runtime(args)
    chat = Chat(model, tokenizer, sampling_from_args(args, stop=_stops(model)))
    chat.upload(args.image)
    questions = list(args.ask)
    interactive = not questions and sys.stdin.isatty()
    if interactive:
        print("Image received. Ask a question (/reset, /image PATH, /quit).")
    lines = iter(questions) if questions else _stdin_lines(interactive)
    for line in lines:
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            chat.reset()
            chat.upload(args.image)
            print("(conversation restarted with the same image)")
            continue
        if line.startswith("/image "):
            args.image = line.split(" ", 1)[1].strip()
            chat.reset()
            chat.upload(args.image)
            print(f"(new image: {args.image})")
            continue
        print(f"Human: {line}\nAssistant: ", end="", flush=True)
        chat.ask(line)
    return 0


def _stdin_lines(interactive: bool):
    while True:
        try:
            yield input("> ") if interactive else next(sys.stdin)
        except (EOFError, StopIteration, KeyboardInterrupt):
            return


def _stops(model) -> tuple[str, ...]:
    from minigpt4.prompts import END_SYMS

    return (END_SYMS[model.cfg.template],)


def cmd_caption(args) -> int:
    import torch

    from minigpt4.images import ImageError, load_pixels
    from minigpt4.prompts import INSTRUCTION_TEMPLATES, Conversation

    model, tokenizer = load_runtime(args)
    params = sampling_from_args(args, stop=_stops(model))
    prompt = args.prompt if "<ImageHere>" in args.prompt else f"<Img><ImageHere></Img> {args.prompt}"
    if not args.raw:
        prompt = INSTRUCTION_TEMPLATES[model.cfg.template].format(prompt)
    conv = Conversation.for_template(model.cfg.template)
    failed = 0
    for start in range(0, len(args.images), args.batch_size):
        batch, pixels = [], []
        for path in args.images[start:start + args.batch_size]:
            try:
                pixels.append(load_pixels([path], model.cfg.image_size))
                batch.append(path)
            except ImageError as e:
                failed += 1
                print(f"{path}\tERROR ({e.reason}): {e}", file=sys.stderr)
        if not batch:
            continue
        comps = model.generate(tokenizer, [prompt] * len(batch), torch.cat(pixels), params)
        for path, c in zip(batch, comps):
            print(f"{path}\t{conv.clean_answer(c.text)}")
    return 1 if failed and failed == len(args.images) else 0


def cmd_demo(args) -> int:
    """The learning proof (see minigpt4.demo): train the tiny model on synthetic scenes from a local S3
    server through Ray Data + Ray Train (stage 1, then stage 2), held-out accuracy before and after,
    then a chat about a held-out image."""
    from minigpt4.demo import run_demo

    return run_demo(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minigpt4", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("chat", help="multi-turn chat about an image in the terminal")
    p.add_argument("--image", required=True, help="image path")
    p.add_argument("--ask", action="append", default=[], help="ask this and exit (repeatable); else read stdin")
    _add_model_args(p)
    p = sub.add_parser("caption", help="caption image files (one line each: path<TAB>caption)")
    p.add_argument("images", nargs="+")
    p.add_argument("--prompt", default="Describe this image in detail.")
    p.add_argument("--raw", action="store_true", help="use --prompt as is, without the instruction template")
    p.add_argument("--batch-size", type=int, default=8)
    _add_model_args(p)
    p = sub.add_parser("demo", help="train the tiny model on synthetic scenes (stage 1 + 2 on Ray Train, data from a "
                                     "local S3 server through Ray Data), held-out accuracy before/after, then a "
                                     "chat about a held-out image (what `make demo` runs)")
    p.add_argument("--output", default="outputs/demo", help="run directory (removed and rewritten on each run)")
    p.add_argument("--quick", action="store_true", help="12 steps per stage: checks the plumbing, not the learning")
    p.add_argument("--expect", type=float, default=None,
                   help="exit 1 when the held-out accuracy after training is below this fraction (e.g. 0.9)")
    _add_model_args(p)
    p.set_defaults(max_new_tokens=64, greedy=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from minigpt4.images import ImageError

    try:
        return {"chat": cmd_chat, "caption": cmd_caption, "demo": cmd_demo}[args.command](args)
    except (ImageError, FileNotFoundError, ValueError) as e:  # bad input: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
