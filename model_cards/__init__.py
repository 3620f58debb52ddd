"""Hugging Face model cards (``README.md`` with YAML metadata) for CLOC models.

* :func:`~model_cards.generate.card_from_results` turns an evaluation / demo results JSON
  (``eval.runner`` rows) into the card of a trained model, with its measured numbers in the
  ``model-index``;
* :func:`~model_cards.generate.paper_card` writes the card of a paper architecture (``cloc-vit-b-16``,
  ``cloc-vit-l-14-336``) for which no official weights exist: the paper's numbers, marked as
  paper-reported, and how to obtain a checkpoint with this project's code.

``python -m model_cards.generate --help`` for the command line. The names are imported lazily so that
``python -m model_cards.generate`` does not import the module twice.
"""

__all__ = ["PAPER_ARCHS", "card_from_results", "paper_card", "write_paper_cards"]


def __getattr__(name):
    if name in __all__:
        from model_cards import generate

        return getattr(generate, name)
    raise AttributeError(f"module 'model_cards' has no attribute {name!r}")
