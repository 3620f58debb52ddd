"""An lmms-eval model plugin for CLOC-LLaVA checkpoints (any saved ``cloc_llava`` or ``llava`` folder).

lmms-eval (``EvolvingLMMs-Lab/lmms-eval``, 0.7+) loads third-party models from the Python entry-point
group ``lmms_eval.models``: each entry point gives a ``ModelManifest`` (or a callable returning one)
naming the model id and the class path. This project declares, in ``pyproject.toml``::

    [project.entry-points."lmms_eval.models"]
    cloc_llava = "eval.lmms_plugin:manifest"

so after ``pip install`` of this project next to lmms-eval::

    lmms-eval --model cloc_llava --model_args pretrained=path/to/ckpt,chat_format=llava \\
        --tasks refcoco_bbox_rec_val --batch_size 8

or, in Python, ``lmms_eval.evaluator.simple_evaluate(model=CLOCLlavaLMMS(pretrained=...), tasks=[...])``.

:class:`CLOCLlavaLMMS` implements the ``lmms`` contract of a "simple" model: ``generate_until``
(batched greedy generation through :class:`eval.mllm_generate.HFGenerator`, stopping at the task's
``until`` strings, ``max_new_tokens`` from its generation kwargs) and ``loglikelihood`` (sum of the
continuation's token log-probabilities given image + context, and whether it is the greedy
continuation); multi-round generation is not supported (as lmms-eval's own ``llava_hf``). The module
imports without lmms-eval installed: the class then derives from a stand-in base with the same
attributes, so its logic can be used and tested; lmms-eval's registry only accepts it when the real
``lmms`` base is importable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from eval.mllm_generate import DEFAULT_UNTIL, HFGenerator, load_mllm

MODEL_ID = "cloc_llava"

try:  # lmms-eval is optional: the plugin is only registered where it is installed
    from lmms_eval.api.model import lmms as _LMMSBase

    HAVE_LMMS_EVAL = True
except ImportError:  # pragma: no cover - exercised where lmms-eval is absent

    class _LMMSBase:  # the attributes of lmms_eval.api.model.lmms that the plugin relies on
        is_simple = True

        def __init__(self) -> None:
            self._rank, self._world_size, self.task_dict = 0, 1, {}

        @property
        def rank(self) -> int:
            return self._rank

        @property
        def world_size(self) -> int:
            return self._world_size

    HAVE_LMMS_EVAL = False


def manifest():
    """The ``lmms_eval.models`` entry point: the manifest registering :class:`CLOCLlavaLMMS` as ``cloc_llava``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.CLOCLlavaLMMS")


def _as_int(value, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


class CLOCLlavaLMMS(_LMMSBase):
    """lmms-eval "simple" model around a LLaVA-style checkpoint.

    Args:
        pretrained: checkpoint folder (loaded with :func:`eval.mllm_generate.load_mllm`); or pass
            ``model`` and ``processor`` objects instead (``simple_evaluate`` with a model instance).
        device: torch device (default ``"cpu"``; lmms-eval passes ``--device``).
        batch_size: questions per ``generate`` call (default 1; lmms-eval passes ``--batch_size``).
        dtype: ``"auto"``, ``"float32"``, ``"bfloat16"`` or ``"float16"`` (default ``"auto"``).
        chat_format: see :func:`eval.mllm_generate.wrap_question` (default ``"auto"``, the tokenizer's
            chat template or LLaVA's ``USER: ... ASSISTANT:``, as lmms-eval's ``llava_hf``).
        max_new_tokens: default generation budget when a task gives none (default 64).
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        device: str | None = "cpu",
        batch_size: int | str = 1,
        dtype: str = "auto",
        chat_format: str = "auto",
        max_new_tokens: int | str = 64,
        model=None,
        processor=None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"unknown model_args for {MODEL_ID}: {sorted(kwargs)}")
        device = device or "cpu"
        if model is None:
            if pretrained is None:
                raise ValueError(f"{MODEL_ID} needs pretrained=<checkpoint folder> (or model= and processor=)")
            model, processor = load_mllm(pretrained, device=device, dtype=dtype)
        elif processor is None:
            raise ValueError("model= needs processor= as well")
        self.generator = HFGenerator(
            model, processor, batch_size=_as_int(batch_size, "batch_size"),
            max_new_tokens=_as_int(max_new_tokens, "max_new_tokens"), chat_format=chat_format, progress=False,
        )
        self._device = next(model.parameters()).device

    # -- lmms attributes ------------------------------------------------------------------------------
    @property
    def model(self):
        return self.generator.model

    @property
    def tokenizer(self):
        return self.generator.processor.tokenizer

    @property
    def batch_size(self) -> int:
        return self.generator.batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    # -- requests -------------------------------------------------------------------------------------
    def _doc_image(self, doc_to_visual, doc_id, task, split):
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        flat = [v for group in visuals for v in (group if isinstance(group, (list, tuple)) else [group])]
        if len(flat) != 1:
            raise ValueError(f"{MODEL_ID} takes one image per question; task {task!r} doc {doc_id} gave {len(flat)}")
        return flat[0]

    def generate_until(self, requests) -> list[str]:
        """One answer per request (``args = (context, gen_kwargs, doc_to_visual, doc_id, task, split)``).

        Requests with equal generation kwargs are batched together; answers come back in request order.
        """
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        answers: list[str | None] = [None] * len(requests)
        for indices in groups.values():
            gen_kwargs = dict(requests[indices[0]].args[1])
            until = gen_kwargs.get("until", DEFAULT_UNTIL)
            until = [until] if isinstance(until, str) else list(until)
            max_new = _as_int(gen_kwargs.get("max_new_tokens", self.generator.max_new_tokens), "max_new_tokens")
            contexts = [requests[i].args[0] for i in indices]
            images = [self._doc_image(*requests[i].args[2:6]) for i in indices]
            out = self.generator(contexts, images, max_new_tokens=max_new, until=until)
            for i, answer in zip(indices, out):
                answers[i] = answer
                hook = getattr(self, "cache_hook", None)
                if hook is not None:
                    hook.add_partial("generate_until", (requests[i].args[0], requests[i].args[1]), answer)
        return answers  # type: ignore[return-value]

    @torch.no_grad()
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """``(log p(continuation | image, context), is greedy)`` per request
        (``args = (context, doc_to_target, doc_to_visual, doc_id, task, split)``)."""
        results = []
        for context, target, doc_to_visual, doc_id, task, split in (r.args for r in requests):
            doc = self.task_dict[task][split][doc_id]
            continuation = target if isinstance(target, str) else target(doc)
            image = self._doc_image(doc_to_visual, doc_id, task, split)
            results.append(self._continuation_logprob(context, str(continuation), image))
        return results

    def _continuation_logprob(self, context: str, continuation: str, image) -> tuple[float, bool]:
        from cloc_hf.image_inputs import load_rgb_image

        processor, prompt = self.generator.processor, self.generator.text(context)
        pil = load_rgb_image(image)
        prefix = processor(images=[pil], text=[prompt], return_tensors="pt")["input_ids"].shape[1]
        inputs = processor(images=[pil], text=[prompt + continuation], return_tensors="pt")
        dtype = next(self.model.parameters()).dtype
        inputs = {k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device)) for k, v in inputs.items()}
        logits = self.model(**inputs).logits[0, :-1].float()
        targets = inputs["input_ids"][0, 1:]
        span = slice(prefix - 1, None)  # positions predicting the continuation's tokens
        logprobs = torch.log_softmax(logits[span], dim=-1)
        picked = logprobs.gather(-1, targets[span, None]).squeeze(-1)
        greedy = bool((logprobs.argmax(-1) == targets[span]).all())
        return float(picked.sum()), greedy

    def generate_until_multi_round(self, requests) -> Sequence[str]:
        raise NotImplementedError(f"{MODEL_ID} does not support multi-round generation")
