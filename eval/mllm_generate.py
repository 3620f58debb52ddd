"""Batched greedy generation with a LLaVA-style MLLM: prompts + images (+ region boxes) -> answer strings.

:class:`HFGenerator` wraps a Hugging Face ``LlavaForConditionalGeneration`` (or
:class:`llava_bridge.CLOCLlavaForConditionalGeneration`) and its processor. Each question is wrapped in
a chat format (:data:`CHAT_FORMATS`), the batch is tokenized with **left padding** (so every row's
answer starts at the same column and greedy decoding of a padded row equals decoding it alone), the
model generates greedily, and each answer is cut at the first stop string (lmms-eval's ``until``).
A ``tqdm`` bar counts the questions.

Anything with the same call signature (``questions, images, boxes=None -> list[str]``) can stand in
for it in :mod:`eval.mllm_rec`, e.g. a stub that returns known answers in tests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from cloc_hf.image_inputs import load_rgb_image
from llava_bridge.constants import IMAGE_TOKEN

# lmms-eval's llava_hf model falls back to a Vicuna-style "USER: ... ASSISTANT:" turn when the tokenizer
# has no chat template; its refcoco tasks stop generation at "ASSISTANT:".
CHAT_FORMATS = {
    "llava": "USER: {image}\n{question} ASSISTANT:",
    "plain": "{image}\n{question}",  # the human turn of the project's instruction records, as written
}
DEFAULT_UNTIL = ("ASSISTANT:",)


def wrap_question(question: str, chat_format: str, image_token: str = IMAGE_TOKEN, tokenizer=None) -> str:
    """The model's text for one question: ``question`` with one ``image_token`` in ``chat_format``.

    ``chat_format`` is ``"llava"``, ``"plain"`` (:data:`CHAT_FORMATS`), ``"tokenizer"`` (the tokenizer's
    chat template, one user turn, generation prompt added), ``"auto"`` (the tokenizer's template when it
    has one, else ``"llava"``, as lmms-eval's ``llava_hf`` does), or a custom string with ``{image}``
    and ``{question}`` fields. A question that already holds the image token is not given another.
    """
    body = question.replace(f"{image_token}\n", "", 1) if image_token in question else question
    if chat_format == "auto":
        chat_format = "tokenizer" if getattr(tokenizer, "chat_template", None) else "llava"
    if chat_format == "tokenizer":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat_format='tokenizer' needs a tokenizer with a chat template")
        messages = [{"role": "user", "content": f"{image_token}\n{body}"}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    template = CHAT_FORMATS.get(chat_format, chat_format)
    if "{question}" not in template or "{image}" not in template:
        raise ValueError(
            f"unknown chat format {chat_format!r}; expected one of {sorted(CHAT_FORMATS)}, 'auto', 'tokenizer' "
            "or a string with {image} and {question} fields"
        )
    return template.format(image=image_token, question=body)


def cut_at_stop(text: str, until: Sequence[str] = DEFAULT_UNTIL) -> str:
    """``text`` up to the first occurrence of any stop string (all of it when none occurs), stripped."""
    end = len(text)
    for stop in until:
        if stop:
            found = text.find(stop)
            if found != -1:
                end = min(end, found)
    return text[:end].strip()


@contextlib.contextmanager
def _left_padding(tokenizer):
    old = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = old


def _model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters())
    return param.device, param.dtype


class HFGenerator:
    """Greedy batched generation with a LLaVA-style model and processor.

    Args:
        model: a ``LlavaForConditionalGeneration`` (or subclass); put in eval mode here.
        processor: its processor (``LlavaProcessor`` or :class:`llava_bridge.CLOCLlavaProcessor`; region
            boxes need the latter).
        batch_size: questions per ``generate`` call (default 8).
        max_new_tokens: generation budget per answer (default 64, enough for a box or a phrase).
        chat_format: see :func:`wrap_question` (default ``"auto"``).
        until: stop strings the answer is cut at (default ``("ASSISTANT:",)``, lmms-eval's refcoco).
        progress: show a ``tqdm`` bar (default ``True``).
    """

    def __init__(
        self,
        model,
        processor,
        *,
        batch_size: int = 8,
        max_new_tokens: int = 64,
        chat_format: str = "auto",
        until: Sequence[str] = DEFAULT_UNTIL,
        progress: bool = True,
    ):
        if batch_size < 1 or max_new_tokens < 1:
            raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}")
        self.model = model.eval()
        self.processor = processor
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.chat_format = chat_format
        self.until = tuple(until)
        self.progress = progress
        self.image_token = getattr(processor, "image_token", IMAGE_TOKEN)
        wrap_question("x", chat_format, self.image_token, processor.tokenizer)  # a bad format fails here

    def text(self, question: str) -> str:
        """The full model text of one question (chat format applied)."""
        return wrap_question(question, self.chat_format, self.image_token, self.processor.tokenizer)

    def __call__(
        self,
        questions: Sequence[str],
        images: Sequence[Any],
        boxes: Sequence[Any] | None = None,
        *,
        max_new_tokens: int | None = None,
        until: Sequence[str] | None = None,
    ) -> list[str]:
        """One answer per question. ``images``: one per question (anything ``load_rgb_image`` reads);
        ``boxes``: per question, original-pixel xyxy boxes for its ``<region>`` tokens (``None``: no regions)."""
        if len(images) != len(questions) or (boxes is not None and len(boxes) != len(questions)):
            raise ValueError(
                f"{len(questions)} questions need as many images and box lists, got {len(images)} images"
                + ("" if boxes is None else f" and {len(boxes)} box lists")
            )
        answers: list[str] = []
        bar = tqdm(total=len(questions), desc="generating", unit="q", disable=not self.progress)
        for start in range(0, len(questions), self.batch_size):
            stop = start + self.batch_size
            chunk_boxes = None if boxes is None else boxes[start:stop]
            answers += self._generate(questions[start:stop], images[start:stop], chunk_boxes, max_new_tokens, until)
            bar.update(len(questions[start:stop]))
        bar.close()
        return answers

    @torch.no_grad()
    def _generate(self, questions, images, boxes, max_new_tokens, until) -> list[str]:
        tokenizer = self.processor.tokenizer
        texts = [self.text(q) for q in questions]
        pil = [load_rgb_image(img, f"images[{i}]") for i, img in enumerate(images)]
        kwargs = {} if boxes is None else {"boxes": [torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4) for b in boxes]}
        with _left_padding(tokenizer), _no_box_text(self.processor, boxes is not None):
            inputs = self.processor(images=pil, text=texts, padding=True, return_tensors="pt", **kwargs)
        device, dtype = _model_device_dtype(self.model)
        moved = {}
        for key, value in inputs.items():
            if torch.is_tensor(value):
                value = value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)
            elif isinstance(value, list) and value and torch.is_tensor(value[0]):  # region_boxes: per sample
                value = [v.to(device) for v in value]
            moved[key] = value
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        out = self.model.generate(
            **moved, max_new_tokens=max_new_tokens or self.max_new_tokens, do_sample=False, pad_token_id=pad
        )
        new = out[:, moved["input_ids"].shape[1] :]
        decoded = tokenizer.batch_decode(new, skip_special_tokens=True)
        return [cut_at_stop(t, self.until if until is None else until) for t in decoded]


@contextlib.contextmanager
def _no_box_text(processor, active: bool):
    """Questions that already hold their box text (instruction records) must not get it written twice."""
    if not active or getattr(processor, "box_convention", None) is None:
        yield
        return
    old = processor.box_convention
    processor.box_convention = None
    try:
        yield
    finally:
        processor.box_convention = old


def load_mllm(path: str, *, device: str = "cpu", dtype: str = "auto"):
    """``(model, processor)`` of a saved LLaVA-style checkpoint (``cloc_llava`` or ``llava``) for generation.

    ``dtype``: ``"auto"`` (the checkpoint's), ``"float32"``, ``"bfloat16"`` or ``"float16"``.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import cloc_hf  # noqa: F401  (registers the CLOC tower classes)
    import llava_bridge  # noqa: F401  (registers cloc_llava with the Auto classes)

    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype, None)
    if torch_dtype is None:
        raise ValueError(f"unknown dtype {dtype!r}; expected auto, float32, bfloat16 or float16")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype).to(device)
    processor = AutoProcessor.from_pretrained(path)
    return model.eval(), processor
