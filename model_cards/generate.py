"""Model cards for CLOC models: from measured results, and for the paper's architectures.

Two kinds of card, both a Hugging Face ``README.md`` (YAML metadata + markdown body) rendered by
``huggingface_hub``'s :meth:`ModelCard.from_template <huggingface_hub.ModelCard.from_template>` from
the Jinja templates in ``model_cards/templates/`` (the prose lives there, not in this module):

* :func:`card_from_results` (``templates/trained_model.md``): a model this project trained, from the
  results of ``eval.runner.evaluate`` / ``cloc-eval`` or the demo's ``report.json``. The measured
  numbers go into the body table and the ``model-index``. :func:`write_demo_card` writes the demo
  checkpoint's card straight from the demo's report.
* :func:`paper_card` (``templates/paper_architecture.md``): a paper architecture (``cloc-vit-b-16``,
  ``cloc-vit-l-14-336``). No official CLOC weights exist, so the card carries the **paper-reported**
  numbers of ``model_cards/paper_results.json`` (the one place they are written), each
  ``model-index`` entry with ``source`` = the paper on arXiv, and explains how to get a checkpoint.

Results rows map onto the ``model-index`` through the schema of :mod:`eval.results` (each row key's
Hub task and metric ids); values are percentages (0-100), as in the rows. Only one row enters the
``model-index``: the model's own region method (``"cloc"``, the Prompter) of the model the card is
about; the other rows (CLIP-style baselines on the same encoder, other models of a comparison) are in
the body table only, as are the paper numbers that are not the architecture's own (ablations, an MLLM
built on it).

Command line (from the repository root)::

    # the card of a trained model, next to its weights
    python -m model_cards.generate --results runs/demo/report.json --out runs/demo/cloc/README.md
    # the paper architectures' cards (cloc-vit-b-16.md, cloc-vit-l-14-336.md)
    python -m model_cards.generate --paper-cards model_cards/cards/

With ``--results``, defaults come from the results and from ``pretrain_config.json`` next to ``--out``
(written by ``cloc-pretrain``): the model name, the architecture and a training summary.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from eval.results import METHOD_SPECS, field_for, load_results, markdown_table, metric_keys, summary_columns

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
PAPER_RESULTS = HERE / "paper_results.json"

TAGS = ["cloc", "clip", "region-text", "grounding", "vision-language", "arxiv:2410.02746"]
# The Hub has no task for region-level (box-prompted) embeddings. CLOC keeps CLIP's image-text head
# unchanged, and the Hub files CLIP-style dual encoders under zero-shot image classification, so
# that is the closest honest tag.
PIPELINE_TAG = "zero-shot-image-classification"
LIBRARY_NAME = "transformers"
DEFAULT_METHOD = "cloc"
DEMO_DATASET = ("cloc-synthetic-scenes", "CLOC synthetic scenes (cloc_data.synthetic)")  # (id, name)


@functools.cache
def paper_results() -> dict[str, Any]:
    """``model_cards/paper_results.json``: the paper's metadata and its reported numbers per architecture."""
    return json.loads(PAPER_RESULTS.read_text(encoding="utf-8"))


def paper_number(arch: str, number_id: str) -> float:
    """One paper-reported value, e.g. ``paper_number("cloc-vit-b-16", "coco_macc")`` (71.1); ``KeyError``
    naming the ids ``arch`` has when ``number_id`` is not one of them."""
    if arch not in paper_results()["architectures"]:
        raise KeyError(f"no paper numbers for {arch!r}; architectures: {sorted(paper_results()['architectures'])}")
    numbers = {n["id"]: n["value"] for n in paper_results()["architectures"][arch]["results"]}
    if number_id not in numbers:
        raise KeyError(f"no paper number {number_id!r} for {arch}; it has {sorted(numbers)}")
    return numbers[number_id]


PAPER = paper_results()["paper"]
PAPER_URL = PAPER["url"]
PAPER_SOURCE_NAME = f"CLOC paper (arXiv {PAPER['arxiv']}), paper-reported"
PAPER_ARCHS: dict[str, dict[str, Any]] = paper_results()["architectures"]


# --------------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------------


def _snippet(name: str, **values: Any) -> str:
    """A shared section (``templates/_<name>.md``), rendered with the Jinja that renders the cards."""
    text = (TEMPLATES / f"_{name}.md").read_text(encoding="utf-8")
    return jinja2.Template(text).render(**values).strip()


def _render(template: str, card_data: ModelCardData, **values: Any) -> ModelCard:
    card = ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATES / template),
        what_is_cloc=_snippet("what_is_cloc", paper=PAPER),
        bibtex="\n".join(PAPER["bibtex"]),
        **values,
    )
    card.text = card.text.rstrip() + "\n"  # Jinja drops the template's final newline; a card file ends with one
    return card


def _how_to_use(path: str, image: str, phrase: str, box: Sequence[int]) -> str:
    return _snippet("how_to_use", path=path, image=image, phrase=phrase, box=list(box))


def architecture_summary(arch: str) -> str | None:
    """A markdown table of a named architecture's sizes and parameter counts, ``None`` for a name the
    registry does not know. The model is built on the meta device: no memory, no weights."""
    import torch

    import cloc_hf

    if arch not in cloc_hf.list_models():
        return None
    config = cloc_hf.get_model_config(arch)
    with torch.device("meta"):
        model = cloc_hf.CLOCModel(config)
    owner = {"visual_projection": "vision_model", "text_projection": "text_model", "logit_scale": "text_model"}
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():
        part = owner.get(name.split(".")[0], name.split(".")[0])
        counts[part] = counts.get(part, 0) + param.numel()

    def millions(n: int) -> str:
        return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.0f}k"

    params = {part: millions(counts.get(part, 0)) for part in ("vision_model", "text_model", "prompter", "box_head")}
    params["total"] = millions(sum(counts.values()))
    return _snippet(
        "architecture",
        vision=config.vision_config,
        text=config.text_config,
        prompter=config.prompter_config,
        projection_dim=config.projection_dim,
        params=params,
    )


# --------------------------------------------------------------------------------------------------
# Cards of trained models, from measured results
# --------------------------------------------------------------------------------------------------


def eval_results_from_row(
    row: Mapping[str, Any], *, dataset_id: str, dataset_name: str, split: str | None
) -> list[EvalResult]:
    """The ``model-index`` entries of one results row (``None`` values and unknown keys are skipped)."""
    results = []
    for key in metric_keys([row]):
        spec = field_for(key)
        results.append(
            EvalResult(
                task_type=spec.task.type,
                task_name=spec.task.name,
                dataset_type=dataset_id,
                dataset_name=dataset_name,
                dataset_split=split,
                metric_type=spec.metric_type,
                metric_name=spec.metric_name,
                metric_config=spec.metric_config,
                metric_args=dict(spec.metric_args) if spec.metric_args else None,
                metric_value=round(float(row[key]), 2),
            )
        )
    return results


def select_row(rows: Sequence[Mapping[str, Any]], method: str, model: str | None) -> Mapping[str, Any] | None:
    """The row of region method ``method`` for the model ``model``.

    ``model=None`` accepts the method's row when exactly one model has one. Returns ``None`` when no
    row has the method; raises ``ValueError`` when several models do and none is chosen, or when the
    chosen model has none (the message lists the models found).
    """
    candidates = [r for r in rows if r.get("name") == method]
    if not candidates:
        return None
    models = [r.get("model") for r in candidates]
    if model is not None:
        chosen = [r for r in candidates if r.get("model") == model]
        if len(chosen) == 1:
            return chosen[0]
        if len(candidates) == 1 and models[0] is None:  # rows without a model name belong to this model
            return candidates[0]
        raise ValueError(f"{len(chosen)} {method!r} rows for model {model!r}; models with such rows: {models}")
    if len(candidates) > 1:
        raise ValueError(f"{method!r} rows of several models {models}: say which one the card is about")
    return candidates[0]


def results_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The card's table of results rows: the schema's columns (:func:`eval.results.summary_columns`),
    the ``model`` column only when the rows come from several models."""
    columns = summary_columns(rows, extra=False)
    if len({r.get("model") for r in rows}) < 2:
        columns = [c for c in columns if c != "model"]
    return markdown_table(rows, columns)


def _setup_lines(meta: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(key, value)`` pairs of an evaluation's ``meta`` for the card, empty values left out."""
    lines = []
    for key, value in meta.items():
        if value is None or value == {} or value == []:
            continue
        if key == "skipped" and isinstance(value, dict):
            value = "; ".join(f"{task}: {why}" for task, why in value.items())
        elif isinstance(value, float):
            value = f"{value:.1f}"
        elif isinstance(value, (list, tuple)):
            value = ", ".join(str(v) for v in value)
        elif isinstance(value, dict):
            value = json.dumps(value, sort_keys=True)
        lines.append((key, str(value)))
    return lines


def card_from_results(
    results: Mapping[str, Any],
    *,
    model_name: str,
    base_arch: str,
    dataset_name: str,
    dataset_id: str,
    license: str = "apache-2.0",
    training_summary: str,
    method: str = DEFAULT_METHOD,
    results_model: str | None = None,
    load_path: str | None = None,
    demo: bool = True,
) -> ModelCard:
    """The card of a trained CLOC model from an evaluation / demo results JSON.

    Args:
        results: ``{"rows": [ROW, ...], "meta": {...}}`` (:mod:`eval.results` rows, in percent; the
            demo's ``report.json`` has the same ``rows``).
        model_name: the model's name (card title and ``model-index`` name).
        base_arch: its architecture (a ``cloc_hf.list_models()`` name gets a size/parameter table).
        dataset_name / dataset_id: pretty name and identifier of the evaluation (and training) data.
        license: SPDX-like Hub license id.
        training_summary: markdown paragraph(s) saying how the model was trained.
        method: the region method whose row goes into the ``model-index`` (``"cloc"``: the Prompter).
        results_model: which model's row, when the results compare several (default: the row whose
            ``model`` is ``model_name``, or the only one).
        load_path: the path or Hub id shown in the loading example (default: ``model_name``).
        demo: the model is the synthetic-scenes demo: say so at the top and in the limitations.
    Returns:
        a :class:`~huggingface_hub.ModelCard`; ``card.save(path)`` writes it.
    Raises:
        ValueError: ``results`` has no ``rows`` list, or the row to report is ambiguous.
    """
    rows = results.get("rows")
    if not isinstance(rows, list):
        raise ValueError("results must hold a 'rows' list (eval.runner / demo report.json format)")
    meta = results.get("meta") or {}
    split = meta.get("split")
    try:
        row = select_row(rows, method, results_model if results_model is not None else model_name)
    except ValueError:
        if results_model is not None:
            raise
        row = select_row(rows, method, None)  # model_name is not a row model: fall back to the only one
    eval_results = eval_results_from_row(row, dataset_id=dataset_id, dataset_name=dataset_name, split=split) if row else []
    card_data = ModelCardData(
        license=license,
        library_name=LIBRARY_NAME,
        pipeline_tag=PIPELINE_TAG,
        tags=list(TAGS),
        datasets=[dataset_id],
        model_name=model_name,
        eval_results=eval_results or None,
    )
    return _render(
        "trained_model.md",
        card_data,
        model_name=model_name,  # ModelCardData.to_dict() moves it into the model-index
        base_arch=base_arch,
        demo=demo,
        architecture=architecture_summary(base_arch),
        training_summary=training_summary.strip(),
        dataset_name=dataset_name,
        dataset_id=dataset_id,
        setup=_setup_lines(meta),
        table=results_table(rows) if rows else None,
        methods=METHOD_SPECS,
        method=method,
        row=row,
        split=split,
        how_to_use=_how_to_use(load_path or model_name, "scene.png", "a red circle", (4, 6, 18, 20)),
    )


def training_summary(pretrain: Mapping[str, Any]) -> str:
    """A one-paragraph training summary from a ``pretrain_config.json`` (``cloc-pretrain`` output);
    settings it lacks print as ``?`` (or the ``PretrainConfig`` default where one is standard)."""
    values = {"objective": "cloc", "regions_per_image": 4, "beta1": 0.9, "beta2": 0.98, "precision": "auto", "seed": 0}
    values.update({k: "?" for k in ("steps", "batch_size", "lr", "weight_decay")})
    if "max_regions" in pretrain:  # the name before PretrainConfig.regions_per_image, in older run folders
        values["regions_per_image"] = pretrain["max_regions"]
    values.update({k: v for k, v in pretrain.items() if v is not None and k != "max_regions"})
    return _snippet("training", **values)


def write_demo_card(report: Mapping[str, Any], run_dir: str | os.PathLike) -> Path:
    """Write ``run_dir/README.md``, the card of the demo's CLOC checkpoint, from the demo's report.

    Args:
        report: the dict the demo writes to ``report.json`` (its ``rows`` compare the ``clip`` and
            ``cloc`` runs; the ``cloc`` run's evaluation setup is in ``details["cloc"]["meta"]``).
        run_dir: the CLOC run's folder (its ``pretrain_config.json`` gives the training summary).
    Returns:
        the card's path.
    """
    run_dir = Path(run_dir)
    meta = dict(((report.get("details") or {}).get("cloc") or {}).get("meta") or {})
    results = {"rows": report["rows"], "meta": {k: meta.get(k) for k in ("data", "split", "max_images")}}
    return _write_results_card(results, run_dir / "README.md", results_model="cloc")


def _write_results_card(
    results: Mapping[str, Any],
    out: Path,
    *,
    model_name: str | None = None,
    arch: str | None = None,
    summary: str | None = None,
    load_path: str | None = None,
    **kwargs: Any,
) -> Path:
    """:func:`card_from_results` with defaults from the results and ``pretrain_config.json`` next to ``out``."""
    pretrain_path = out.parent / "pretrain_config.json"
    pretrain = json.loads(pretrain_path.read_text(encoding="utf-8")) if pretrain_path.exists() else {}
    kwargs.setdefault("dataset_id", DEMO_DATASET[0])
    kwargs.setdefault("dataset_name", DEMO_DATASET[1])
    card = card_from_results(
        results,
        model_name=model_name or _default_model_name(results, out),
        base_arch=arch or pretrain.get("arch") or "cloc-tiny-demo",
        training_summary=summary
        or (training_summary(pretrain) if pretrain else "Trained with the CLOC project's `cloc-pretrain`."),
        load_path=load_path or str(out.parent),
        **kwargs,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    card.save(out)
    return out


def _default_model_name(results: Mapping[str, Any], out: Path) -> str:
    meta_model = (results.get("meta") or {}).get("model")
    if meta_model:
        return str(meta_model)
    models = {r.get("model") for r in results.get("rows", []) if r.get("model")}
    return models.pop() if len(models) == 1 else out.resolve().parent.name


# --------------------------------------------------------------------------------------------------
# Paper architectures: paper-reported numbers, no weights
# --------------------------------------------------------------------------------------------------


def _paper_eval_results(numbers: Sequence[Mapping[str, Any]]) -> list[EvalResult]:
    # `verified` is left unset on purpose: huggingface_hub documents it as computed by the Hub's
    # evaluation service ("do not set"). The `source` (name + URL of the paper) is what marks these
    # numbers as taken from the paper rather than measured on this checkpoint.
    out = []
    for number in numbers:
        entry = number.get("model_index")
        if not entry:  # not the architecture's own encoder number (an ablation, an MLLM built on it)
            continue
        spec = field_for(entry["row_key"])
        if spec is None or not spec.is_metric:
            raise ValueError(f"{PAPER_RESULTS}: {number['benchmark']!r} names an unknown row key {entry['row_key']!r}")
        out.append(
            EvalResult(
                task_type=spec.task.type,
                task_name=spec.task.name,
                dataset_type=entry["dataset_type"],
                dataset_name=entry["dataset_name"],
                dataset_split=entry.get("dataset_split"),
                metric_type=spec.metric_type,
                metric_name=f"{number['metric']} (paper-reported)",
                metric_value=number["value"],
                source_name=PAPER_SOURCE_NAME,
                source_url=PAPER_URL,
            )
        )
    return out


def paper_card(arch: str, *, license: str = "apache-2.0") -> ModelCard:
    """The card of a paper architecture: its paper-reported numbers and how to get a checkpoint.

    Args:
        arch: a key of :data:`PAPER_ARCHS` (``"cloc-vit-b-16"`` or ``"cloc-vit-l-14-336"``).
        license: the license of this project's code (no weights are distributed).
    """
    if arch not in PAPER_ARCHS:
        raise ValueError(f"no paper card for {arch!r}; available: {', '.join(PAPER_ARCHS)}")
    spec = PAPER_ARCHS[arch]
    card_data = ModelCardData(
        license=license,
        library_name=LIBRARY_NAME,
        pipeline_tag=PIPELINE_TAG,
        tags=list(TAGS),
        model_name=arch,
        eval_results=_paper_eval_results(spec["results"]),
    )
    return _render(
        "paper_architecture.md",
        card_data,
        arch=arch,
        title=spec["title"],
        convert_from=spec["convert_from"],
        results=spec["results"],
        after_table=spec.get("after_table"),
        paper=PAPER,
        training=paper_results()["training"],
        architecture=architecture_summary(arch) or "",
        how_to_use=_how_to_use(f"runs/{arch}", "photo.jpg", "a dog", (40, 60, 200, 240)),
    )


def write_paper_card(arch: str, out: str | os.PathLike) -> Path:
    """Write the card of paper architecture ``arch`` to ``out`` (a ``.md`` path); returns it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paper_card(arch).save(out)
    return out


def write_paper_cards(out_dir: str | os.PathLike, archs: Sequence[str] | None = None) -> list[Path]:
    """Write ``<arch>.md`` for each paper architecture (default: all) into ``out_dir``; returns the paths."""
    return [write_paper_card(arch, Path(out_dir) / f"{arch}.md") for arch in archs or list(PAPER_ARCHS)]


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m model_cards.generate",
        description="Write CLOC model cards (README.md) from results JSON, or the paper architectures' cards.",
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--results", type=Path, help="results JSON (eval.runner output or the demo's report.json)")
    mode.add_argument("--paper-cards", type=Path, metavar="DIR", help="write <arch>.md for each paper architecture")
    parser.add_argument("--out", type=Path, help="card path for --results (e.g. runs/demo/cloc/README.md)")
    parser.add_argument("--model-name", help="default: the results' model name, else the --out folder's name")
    parser.add_argument("--arch", help="architecture name (default: pretrain_config.json next to --out, "
                        "else cloc-tiny-demo)")
    parser.add_argument("--dataset-name", default=DEMO_DATASET[1])
    parser.add_argument("--dataset-id", default=DEMO_DATASET[0])
    parser.add_argument("--license", default="apache-2.0")
    parser.add_argument("--training-summary", help="markdown text; default: built from pretrain_config.json")
    parser.add_argument("--method", default=DEFAULT_METHOD, help="region method reported in model-index")
    parser.add_argument("--results-model", help="which model's rows, when the results compare several")
    parser.add_argument("--load-path", help="path or Hub id shown in the loading example (default: --out's folder)")
    parser.add_argument("--not-demo", action="store_true", help="drop the synthetic-demo warning and limitations")
    args = parser.parse_args(argv)

    if args.paper_cards is not None:
        for path in write_paper_cards(args.paper_cards):
            print(path)
        return 0
    if args.out is None:
        parser.error("--results needs --out")
    path = _write_results_card(
        load_results(args.results),
        args.out,
        model_name=args.model_name,
        arch=args.arch,
        summary=args.training_summary,
        load_path=args.load_path,
        dataset_name=args.dataset_name,
        dataset_id=args.dataset_id,
        license=args.license,
        method=args.method,
        results_model=args.results_model,
        demo=not args.not_demo,
    )
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
