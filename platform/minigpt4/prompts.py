"""Prompt templates, image splicing, answer-only label masks, and the chat Conversation.

Every detail here decides parity with the original MiniGPT-4 implementation:
- a prompt is split on `<ImageHere>`; each text segment is tokenized on its own with
  `add_special_tokens=False` (so each gets its own leading-space marker); image tokens go between;
- training: `[BOS] + prompt + (answer + end_sym)[:max_txt_len] + padding`, labels -100 everywhere
  but the answer (and, like the original, on answer tokens equal to the pad id `$$`);
- generation: BOS only on the first segment (`add_special_tokens=True` there), left padding,
  context left-truncated to `max_length - max_new_tokens`.
"""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field

import torch

from minigpt4.model import IMAGE_TOKEN_ID

IMAGE_PLACEHOLDER = "<ImageHere>"
IMAGE_PROMPT = "<Img><ImageHere></Img>"

# MiniGPT-4's prompts/alignment.txt: the stage-2 instructions, one drawn per batch.
ALIGNMENT_INSTRUCTIONS = (
    "<Img><ImageHere></Img> Describe this image in detail.",
    "<Img><ImageHere></Img> Take a look at this image and describe what you notice.",
    "<Img><ImageHere></Img> Please provide a detailed description of the picture.",
    "<Img><ImageHere></Img> Could you describe the contents of this image for me?",
)

# Stage-2 instruction templates ({} = one alignment instruction) and answer terminators.
INSTRUCTION_TEMPLATES = {"vicuna_v0": "###Human: {} ###Assistant: ", "llama2": "[INST] {} [/INST] "}
END_SYMS = {"vicuna_v0": "###", "llama2": "</s>"}
STAGE1_END_SYM = "\n"

CHAT_SYSTEM = ("Give the following image: <Img>ImageContent</Img>. "
               "You will be able to see the image once I provide it to you. Please answer my questions.")


def split_prompt(prompt: str) -> list[str]:
    """Text segments around `<ImageHere>` placeholders (k placeholders -> k + 1 segments)."""
    return prompt.split(IMAGE_PLACEHOLDER)


def tokenize_segments(tokenizer, prompt: str, bos: bool) -> list[list[int]]:
    """Each segment tokenized on its own; with bos=True the first segment gets the tokenizer's BOS
    (generation), otherwise no special tokens anywhere (training adds BOS itself)."""
    out = []
    for i, seg in enumerate(split_prompt(prompt)):
        add_special = bos and i == 0
        out.append(tokenizer(seg, add_special_tokens=add_special).input_ids if (seg or add_special) else [])
    return out


def encode_training_sample(tokenizer, prompt: str | None, answer: str, end_sym: str, max_txt_len: int,
                           num_image_tokens: int, max_context_len: int = 3800) -> dict:
    """One training example as ids with image placeholders.

    prompt: None for stage 1 (`[BOS][img][caption + "\\n"]`), else the templated instruction holding
    `<ImageHere>`. Returns input_ids (with IMAGE_TOKEN_ID runs), labels, and prompt_len (BOS + prompt,
    which `collate_training` needs to reproduce the original padded length).
    """
    if prompt is None:
        prompt = IMAGE_PLACEHOLDER
    prompt_ids: list[int] = []
    segs = tokenize_segments(tokenizer, prompt, bos=False)
    for i, seg in enumerate(segs):
        prompt_ids += seg
        if i < len(segs) - 1:
            prompt_ids += [IMAGE_TOKEN_ID] * num_image_tokens
    prompt_ids = prompt_ids[:max_context_len]
    # the original truncates answer + end_sym together: a long caption loses its end_sym
    answer_ids = tokenizer(answer + end_sym, add_special_tokens=False).input_ids[:max_txt_len]
    pad = tokenizer.pad_token_id
    input_ids = [tokenizer.bos_token_id] + prompt_ids + answer_ids
    labels = [-100] * (1 + len(prompt_ids)) + [(-100 if t == pad else t) for t in answer_ids]
    return {"input_ids": input_ids, "labels": labels, "prompt_len": 1 + len(prompt_ids)}


def collate_training(samples: list[dict], pad_token_id: int, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad encoded samples into tensors.

    Length = max(prompt_len) + max(answer_len) (the original's `[BOS] + cond + regress` shape) unless
    pad_to is given. Padding ids are the pad token with attention 0 and label -100; real tokens sit at
    positions 0..n-1 in every row, so logits equal the original's position by position.
    """
    lengths = [len(s["input_ids"]) for s in samples]
    if pad_to is None:
        pad_to = max(s["prompt_len"] for s in samples) + max(n - s["prompt_len"] for n, s in zip(lengths, samples))
    if max(lengths) > pad_to:
        raise ValueError(f"a sample of {max(lengths)} tokens does not fit pad_to={pad_to}")
    b = len(samples)
    input_ids = torch.full((b, pad_to), pad_token_id, dtype=torch.long)
    labels = torch.full((b, pad_to), -100, dtype=torch.long)
    attention_mask = torch.zeros((b, pad_to), dtype=torch.long)
    for i, (s, n) in enumerate(zip(samples, lengths)):
        input_ids[i, :n] = torch.tensor(s["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.tensor(s["labels"], dtype=torch.long)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def follow_up(prompt: str, answer: str, question: str, template: str) -> str:
    """The prompt of a second turn: the first turn's prompt and answer, the answer closed by the template's
    end symbol as in training, then `question` in the instruction template. Vicuna v0:
    `###Human: ... ###Assistant: {answer}###Human: Continue ###Assistant: ` (MiniGPT-4's continuation of
    short stage-2 descriptions)."""
    turn = INSTRUCTION_TEMPLATES[template]
    end = "" if turn.startswith(END_SYMS[template]) else END_SYMS[template]  # Vicuna's turn opens with ###
    return prompt + answer + end + turn.format(question)


def stage2_prompt(template: str, rng: random.Random | None = None, instruction: str | None = None) -> str:
    """The stage-2 prompt: a random alignment instruction inside the template (one per batch, as the original)."""
    instruction = instruction or (rng or random).choice(ALIGNMENT_INSTRUCTIONS)
    return INSTRUCTION_TEMPLATES[template].format(instruction)


# -- chat ---------------------------------------------------------------------------------------
@dataclass
class Conversation:
    """Multi-turn chat state in MiniGPT-4's format.

    Vicuna v0 renders `{system}###Human: <Img><ImageHere></Img> question###Assistant: answer###...`
    and LLaMA-2 `{system}<s>[INST] <Img><ImageHere></Img> question [/INST] answer...`. Images are
    held as tensors beside the text; the prompt carries one `<ImageHere>` per image, in order.
    """

    system: str
    roles: tuple[str, str]
    sep: str
    stop: tuple[str, ...]
    messages: list[list] = field(default_factory=list)
    images: list = field(default_factory=list)

    @classmethod
    def for_template(cls, template: str, system: str = CHAT_SYSTEM) -> "Conversation":
        if template == "vicuna_v0":
            return cls(system=system, roles=("Human: ", "Assistant: "), sep="###", stop=("###",))
        if template == "llama2":
            return cls(system=system, roles=("<s>[INST] ", " [/INST] "), sep="", stop=("</s>",))
        raise ValueError(f"unknown template {template!r}")

    def add_image(self, image) -> None:
        """An image turn: appended as a user message `<Img><ImageHere></Img>` (text follows in ask)."""
        self.images.append(image)
        self.messages.append([self.roles[0], IMAGE_PROMPT])

    def ask(self, text: str) -> None:
        if self.messages and self.messages[-1][0] == self.roles[0] and self.messages[-1][1].endswith("</Img>"):
            self.messages[-1][1] = " ".join([self.messages[-1][1], text])  # question joins the image turn
        else:
            self.messages.append([self.roles[0], text])

    def prompt(self) -> str:
        """The generation prompt: history plus the open assistant turn."""
        ret = self.system + self.sep
        for role, message in self.messages + [[self.roles[1], None]]:
            ret += role + message + self.sep if message else role
        return ret

    def answer(self, text: str) -> None:
        self.messages.append([self.roles[1], text])

    def clean_answer(self, text: str) -> str:
        """As the original: cut at the separator, drop an echoed role prefix, strip."""
        for s in self.stop:
            text = text.split(s)[0]
        return text.split(self.roles[1].strip())[-1].strip()

    def copy(self) -> "Conversation":
        c = copy.copy(self)
        c.messages = [list(m) for m in self.messages]
        c.images = list(self.images)
        return c
