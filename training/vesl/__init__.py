"""VESL: pseudo-label images with region-text pairs (docs/design.md section 6).

Stage 1 :mod:`~training.vesl.captioner` (re-)captions each image, stage 2
:mod:`~training.vesl.phrases` extracts up to 20 noun phrases, stage 3
:mod:`~training.vesl.grounder` boxes them with OWLv2; :mod:`~training.vesl.pipeline` runs the
stages over resumable chunks and writes region-text shards. Command line: ``cloc-vesl``
(:mod:`training.vesl.cli`).
"""

from training.vesl.captioner import Captioner, HFCaptioner, KeepCaption
from training.vesl.grounder import Detection, Grounder, Owlv2Grounder, detections_from_outputs
from training.vesl.phrases import (
    NP_GRAMMAR,
    STOPWORDS,
    WEB_WORDS,
    PhraseExtractor,
    extract_noun_phrases,
    lexicon_tagger,
    nltk_tagger,
    resolve_tagger,
    tokenize,
)
from training.vesl.pipeline import VeslConfig, VeslPipeline, VeslResult, run_vesl, summarize
from training.vesl.sources import ImageFolderSource, ShardInputSource, assign_chunks, open_source

__all__ = [
    "NP_GRAMMAR",
    "STOPWORDS",
    "WEB_WORDS",
    "Captioner",
    "Detection",
    "Grounder",
    "HFCaptioner",
    "ImageFolderSource",
    "KeepCaption",
    "Owlv2Grounder",
    "PhraseExtractor",
    "ShardInputSource",
    "VeslConfig",
    "VeslPipeline",
    "VeslResult",
    "assign_chunks",
    "detections_from_outputs",
    "extract_noun_phrases",
    "lexicon_tagger",
    "nltk_tagger",
    "open_source",
    "resolve_tagger",
    "run_vesl",
    "summarize",
    "tokenize",
]
