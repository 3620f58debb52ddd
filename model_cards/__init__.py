"""Hugging Face model cards (``README.md`` with YAML metadata) for CLOC models.

* :func:`write_demo_card` / :func:`card_from_results`: the card of a trained model from its
  evaluation results (``eval.results`` rows), with the measured numbers in the ``model-index``;
* :func:`write_paper_card` / :func:`paper_card`: the card of a paper architecture (``cloc-vit-b-16``,
  ``cloc-vit-l-14-336``) for which no official weights exist: the paper's numbers
  (``model_cards/paper_results.json``), marked as paper-reported, and how to obtain a checkpoint;
* :func:`write_mllm_card`: the card of the CLOC-LLaVA that ``make demo-mllm`` trains (``model_cards.mllm``).

The cards are rendered from the Jinja templates in ``model_cards/templates/``. ``python -m
model_cards.generate --help`` for the command line. The names are imported lazily so that
``python -m model_cards.generate`` does not import the module twice.
"""

__all__ = [
    "PAPER_ARCHS",
    "card_from_results",
    "paper_card",
    "paper_number",
    "paper_results",
    "write_demo_card",
    "write_mllm_card",
    "write_paper_card",
    "write_paper_cards",
]


def __getattr__(name):
    if name == "write_mllm_card":
        from model_cards import mllm

        return mllm.write_mllm_card
    if name in __all__:
        from model_cards import generate

        return getattr(generate, name)
    raise AttributeError(f"module 'model_cards' has no attribute {name!r}")
