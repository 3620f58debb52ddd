"""VESL stage 1: (re-)caption images.

A captioner is anything that satisfies :class:`Captioner`: ``captions = captioner(images)``.
:class:`HFCaptioner` wraps any Hugging Face image-to-text / image-text-to-text checkpoint that
``AutoModelForImageTextToText`` loads (BLIP, Florence-2, LLaVA and the other VLMs, and
``VisionEncoderDecoderModel`` captioners), by hub id or local path, with batched ``generate``.
``--keep-caption`` skips this stage and keeps each input's existing caption instead.

Prompts: captioning models differ in what they expect.

* BLIP: no prompt, or a text prefix such as ``"a picture of"`` that the caption continues.
* Florence-2: a task token, e.g. ``"<MORE_DETAILED_CAPTION>"``.
* Chat VLMs (LLaVA, Qwen-VL...): an instruction such as ``"Describe this image in detail."``; when
  the processor has a chat template it is applied (``use_chat_template=None`` means "when there is one").

The prompt is removed from the decoded output: decoder-only models return prompt + answer, BLIP
returns the prefix it continued.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Protocol, runtime_checkable

import torch

logger = logging.getLogger(__name__)


@runtime_checkable
class Captioner(Protocol):
    """``captioner(images) -> captions``: one caption per RGB PIL image, same order."""

    def __call__(self, images: list[Any]) -> list[str]: ...


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``"auto"``: bfloat16 on a CUDA device that supports it, float32 otherwise (bf16 is slow on CPU)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; expected 'auto' or one of {sorted(names)}")
    return names[dtype]


_SPACES = re.compile(r"\s+")


def _clean(text: str) -> str:
    return _SPACES.sub(" ", text).strip()


class HFCaptioner:
    """Batched captioning with a Hugging Face image-text-to-text model.

    Args:
        model_name_or_path: hub id or local folder with the model and its processor.
        prompt: text prompt (see the module docstring); ``None`` for unconditional captioning.
        max_new_tokens: generation budget per caption (the paper asks for long, detailed captions).
        device, dtype: where and in which precision the model runs (``dtype="auto"``: see
            :func:`resolve_dtype`).
        use_chat_template: wrap the prompt with the processor's chat template; ``None``: when it has one.
        generate_kwargs: extra ``generate`` arguments (``num_beams``, ``repetition_penalty``...);
            decoding is greedy by default, so labels are reproducible.
        model_kwargs: extra ``from_pretrained`` arguments (``revision``, ``trust_remote_code``...).
    """

    def __init__(
        self,
        model_name_or_path: str,
        *,
        prompt: str | None = None,
        max_new_tokens: int = 77,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = "auto",
        use_chat_template: bool | None = None,
        generate_kwargs: dict[str, Any] | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ):
        from transformers import (
            AutoImageProcessor,
            AutoModelForImageTextToText,
            AutoProcessor,
            AutoTokenizer,
            ProcessorMixin,
        )

        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.name = str(model_name_or_path)
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        try:
            self.processor = AutoProcessor.from_pretrained(self.name, **(model_kwargs or {}))
            if isinstance(self.processor, ProcessorMixin):  # images + text in one processor
                self.tokenizer = self.processor.tokenizer
            else:  # VisionEncoderDecoder checkpoints: an image processor and a tokenizer, side by side
                self.processor = AutoImageProcessor.from_pretrained(self.name, **(model_kwargs or {}))
                self.tokenizer = AutoTokenizer.from_pretrained(self.name, **(model_kwargs or {}))
            self.model = AutoModelForImageTextToText.from_pretrained(
                self.name, dtype=self.dtype, **(model_kwargs or {})
            )
        except (OSError, ValueError) as err:
            raise ValueError(
                f"captioner {self.name!r} could not be loaded as an image-text-to-text model "
                f"(AutoProcessor + AutoModelForImageTextToText): {err}"
            ) from err
        self.takes_text = isinstance(self.processor, ProcessorMixin)
        if prompt is not None and not self.takes_text:
            raise ValueError(
                f"captioner {self.name!r} has an image processor but no multimodal processor: it takes no prompt"
            )
        self.model.to(self.device).eval()
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.generate_kwargs = {"do_sample": False, **(generate_kwargs or {})}
        has_template = getattr(self.processor, "chat_template", None) is not None
        if use_chat_template and not has_template:
            raise ValueError(
                f"captioner {self.name!r}: use_chat_template=True but its processor has no chat template"
            )
        self.use_chat_template = has_template if use_chat_template is None else use_chat_template
        if self.use_chat_template and prompt is None:
            raise ValueError(f"captioner {self.name!r} is a chat model: give an instruction with prompt=...")
        if not self.model.config.is_encoder_decoder:
            self.tokenizer.padding_side = "left"  # decoder-only generation continues from the right end

    def _prompt_text(self) -> str | None:
        if self.prompt is None or not self.use_chat_template:
            return self.prompt
        conversation = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt}]}
        ]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)

    def _decode(self, generated: torch.Tensor, input_ids: torch.Tensor | None) -> list[str]:
        if input_ids is not None and generated.shape[1] > input_ids.shape[1]:
            prefix = generated[:, : input_ids.shape[1]]
            if torch.equal(prefix, input_ids.to(prefix.device)):
                generated = generated[:, input_ids.shape[1] :]  # decoder-only: prompt + answer
        texts = [_clean(t) for t in self.tokenizer.batch_decode(generated, skip_special_tokens=True)]
        if self.prompt is not None:
            prompt = _clean(self.prompt).lower()
            texts = [t[len(prompt) :].strip() if t.lower().startswith(prompt) else t for t in texts]
        return texts

    @torch.inference_mode()
    def __call__(self, images: list[Any]) -> list[str]:
        if not images:
            return []
        text = self._prompt_text()
        kwargs: dict[str, Any] = {"images": list(images), "return_tensors": "pt"}
        if text is not None:
            kwargs["text"] = [text] * len(images)
            kwargs["padding"] = True
        inputs = self.processor(**kwargs).to(self.device, dtype=self.dtype)  # casts floating tensors only
        input_ids = inputs.get("input_ids")
        input_ids = input_ids.clone() if input_ids is not None else None  # BLIP edits input_ids in place
        generated = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, **self.generate_kwargs)
        return self._decode(generated, input_ids)


class KeepCaption:
    """Marker captioner for ``--keep-caption``: the pipeline keeps each input's existing caption.

    Calling it is an error: the pipeline reads the caption from the input (a shard sample's caption,
    or ``IMAGE.txt`` beside an image file) instead of calling a model.
    """

    name = "existing"

    def __call__(self, images: list[Any]) -> list[str]:
        raise RuntimeError(
            "KeepCaption is a marker: the pipeline reads existing captions instead of calling it"
        )
