"""VESL stage 2: noun phrases from a caption, as in the CLOC paper (docs/design.md section 6).

Steps, in order: lower-case -> tokenize -> drop generic web words -> POS-tag -> chunk with
:data:`NP_GRAMMAR` -> drop stopword-only phrases -> de-duplicate (first occurrence wins) -> keep at
most ``max_phrases`` (20), in caption order.

POS tagging is pluggable: a *tagger* is any ``Callable[[list[str]], list[tuple[str, str]]]`` that
returns one Penn-Treebank tag per token. :func:`resolve_tagger` picks NLTK's averaged-perceptron
tagger (what the paper's pipeline implies) when its data is installed, and otherwise falls back, with
a warning, to :func:`lexicon_tagger`: a small, approximate, dependency-free tagger that keeps the
pipeline runnable where NLTK data cannot be downloaded. Phrases from the lexicon tagger are noisier;
install the NLTK data for real runs::

    python -m nltk.downloader averaged_perceptron_tagger_eng

Neither the tokenizer (a regular expression) nor the stopword list needs any NLTK download.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

Tagger = Callable[[list[str]], list[tuple[str, str]]]

# The paper's chunk grammar: an optional determiner, any adjectives, one or more nouns.
NP_GRAMMAR = "NP: {<DT>?<JJ.*>*<NN.*>+}"

MAX_PHRASES = 20

NLTK_TAGGER_RESOURCE = "taggers/averaged_perceptron_tagger_eng/"
NLTK_TAGGER_INSTALL_HINT = "python -m nltk.downloader averaged_perceptron_tagger_eng"

# Words that describe the *file* or the web page rather than what is in the image. Alt-texts and
# captions scraped from the web are full of them ("stock photo of a red car, hd wallpaper.jpg"), and
# the detector cannot ground them. They are removed as tokens before tagging, so "a stock photo of a
# dog" still yields "a dog". Override with ``PhraseExtractor(web_words=...)`` or ``--web-words``.
WEB_WORDS: frozenset[str] = frozenset(
    # file formats and image-file jargon
    "jpg jpeg png gif webp bmp tif tiff svg eps img pic pics heic "
    # the medium itself
    "image images photo photos photograph photographs photography picture pictures snapshot "
    "wallpaper wallpapers thumbnail thumbnails screenshot screensaver "
    "clipart clip-art vector vectors illustration illustrations graphic graphics render "
    # stock / licensing / resolution boilerplate
    "stock royalty royalty-free download downloads hd uhd fhd 4k 8k 1080p 720p hq resolution "
    "high-resolution hi-res watermark copyright licensed license premium editorial "
    # stock-photo agencies that appear in alt-texts
    "shutterstock alamy getty gettyimages istock istockphoto dreamstime depositphotos 123rf "
    "pixabay unsplash pexels freepik".split()
)

# English function words; a phrase made only of these ("this", "the one", "something") names
# nothing a detector can find. Written out here so that no NLTK corpus download is needed.
STOPWORDS: frozenset[str] = frozenset(
    # articles, determiners, quantifiers
    "a an the this that these those each every either neither some any no none all both few many "
    "much more most less least several such own other another same what which whose whatever "
    # pronouns
    "i me my mine myself we us our ours ourselves you your yours yourself yourselves he him his "
    "himself she her hers herself it its itself they them their theirs themselves one ones "
    "someone somebody something anyone anybody anything everyone everybody everything nobody nothing "
    "who whom "
    # prepositions and conjunctions
    "of in on at by for with about against between into through during before after above below to "
    "from up down out off over under again further then once and but or nor so yet if because as "
    "until while than "
    # auxiliaries and very common verbs
    "am is are was were be been being have has had having do does did doing can could will would "
    "shall should may might must "
    # adverbs and others
    "here there when where why how not only very too just also now ever never always often s t "
    "don doesn didn isn aren wasn weren won wouldn shouldn couldn".split()
)

# Lower-case words, numbers and hyphenated / apostrophe compounds ("t-shirt", "dog's") are tokens;
# every other non-space character is a token of its own, so punctuation still separates phrases.
_TOKEN_RE = re.compile(r"[a-z0-9]+(?:['\u2019-][a-z0-9]+)*|[^\sa-z0-9]")
_WORD_RE = re.compile(r"[a-z0-9]")


def tokenize(text: str) -> list[str]:
    """Lower-case ``text`` and split it into word and punctuation tokens (no punkt data needed)."""
    return _TOKEN_RE.findall(text.lower())


# --- taggers ------------------------------------------------------------------------------------


def nltk_tagger_available() -> bool:
    """Whether NLTK and its English averaged-perceptron tagger data are installed."""
    try:
        import nltk
    except ImportError:
        return False
    try:
        nltk.data.find(NLTK_TAGGER_RESOURCE)
    except LookupError:
        return False
    return True


def nltk_tagger() -> Tagger:
    """NLTK's ``pos_tag`` (Penn Treebank tags); raises ``LookupError`` saying how to install its data."""
    if not nltk_tagger_available():
        raise LookupError(
            f"NLTK's POS tagger data {NLTK_TAGGER_RESOURCE!r} is not installed (searched nltk.data.path). "
            f"Install it with `{NLTK_TAGGER_INSTALL_HINT}` (or copy the folder into one of nltk.data.path), "
            "or choose tagger='lexicon' for the approximate built-in tagger."
        )
    import nltk

    def tag(tokens: list[str]) -> list[tuple[str, str]]:
        return nltk.pos_tag(tokens, lang="eng")

    return tag


_LEXICON: dict[str, str] = {}
for _tag, _words in {
    "DT": "a an the this that these those each every another no some any all both either neither",
    "PRP": "i me we us you he him she her it they them one",
    "PRP$": "my our your his its their",
    "IN": "of in on at by for with about against between into through during before after above below "
    "from up down out off over under near beside behind inside outside onto upon across along around "
    "beneath underneath toward towards among within without like as than while because if",
    "TO": "to",
    "CC": "and or but nor yet so",
    "MD": "can could will would shall should may might must",
    "VBZ": "is has does shows depicts features contains sits stands holds lies wears looks appears seems "
    "includes rests hangs runs walks flies grows covers surrounds fills",
    "VBP": "are am have do show depict sit stand hold lie wear look appear seem include",
    "VBD": "was were had did",
    "VB": "be",
    "VBN": "been",
    "VBG": "being having",
    "RB": "not very too also just only there here then now quite rather almost really together away",
    "WDT": "which what whatever",
    "WP": "who whom",
    "WRB": "when where why how",
    "CD": "zero one two three four five six seven eight nine ten eleven twelve twenty hundred thousand",
    "JJ": "red blue green yellow black white gray grey brown orange pink purple golden silver dark light "
    "bright pale large small big little tiny huge tall short long wide narrow old new young modern "
    "ancient empty full open closed wooden metal plastic glass round flat thick thin hot cold warm "
    "wet dry clean dirty beautiful pretty cute happy sad colorful multicolored striped spotted "
    "several many few other same different various upper lower "
    "central next outdoor indoor sunny cloudy snowy rainy fresh ripe busy quiet calm smiling",
}.items():
    for _word in _words.split():
        _LEXICON.setdefault(_word, _tag)
_JJ_SUFFIXES = ("ous", "ful", "less", "ive", "able", "ible", "ish", "ese", "ian", "ic", "ary")


def lexicon_tagger(tokens: list[str]) -> list[tuple[str, str]]:
    """An approximate Penn-Treebank tagger: a closed-class lexicon, a few suffix rules, else noun.

    Good enough for the chunk grammar on simple, descriptive captions (closed-class words are what
    break noun phrases apart); it mis-tags ambiguous words ("light", "back", verbs it doesn't know,
    which become nouns). Use NLTK's tagger for real pseudo-labelling runs.
    """
    tags = []
    for token in tokens:
        if token in _LEXICON:
            tag = _LEXICON[token]
        elif not _WORD_RE.search(token):
            tag = token if token in ".,:;()" else ":"  # punctuation tags itself, as in Penn Treebank
        elif token.replace(".", "").isdigit():
            tag = "CD"
        elif token.endswith("ing") and len(token) > 5:
            tag = "VBG"
        elif token.endswith("ly") and len(token) > 4:
            tag = "RB"
        elif token.endswith("ed") and len(token) > 4:
            tag = "VBN"
        elif token.endswith(_JJ_SUFFIXES) and len(token) > 5:
            tag = "JJ"
        elif token.endswith("s") and not token.endswith("ss") and len(token) > 3:
            tag = "NNS"
        else:
            tag = "NN"
        tags.append((token, tag))
    return tags


TAGGER_NAMES = ("auto", "nltk", "lexicon")


def resolve_tagger(tagger: str | Tagger = "auto") -> tuple[Tagger, str]:
    """Return ``(tagger, name)`` for a tagger name or a callable.

    ``"auto"``: NLTK's tagger when its data is installed, else the lexicon tagger with a warning that
    says how to install the NLTK data. ``"nltk"``: NLTK or a ``LookupError``. ``"lexicon"``: the
    built-in approximate tagger. A callable is used as it is (name: its ``__name__``).
    """
    if callable(tagger):
        return tagger, getattr(tagger, "__name__", type(tagger).__name__)
    if tagger == "nltk":
        return nltk_tagger(), "nltk"
    if tagger == "lexicon":
        return lexicon_tagger, "lexicon"
    if tagger == "auto":
        if nltk_tagger_available():
            return nltk_tagger(), "nltk"
        logger.warning(
            "NLTK's POS tagger data %r is not installed; falling back to the approximate built-in "
            "lexicon tagger (noisier noun phrases). Install it with `%s` for paper-faithful phrases.",
            NLTK_TAGGER_RESOURCE,
            NLTK_TAGGER_INSTALL_HINT,
        )
        return lexicon_tagger, "lexicon"
    raise ValueError(f"unknown tagger {tagger!r}; expected one of {TAGGER_NAMES} or a callable")


# --- extraction ---------------------------------------------------------------------------------


@dataclass
class PhraseExtractor:
    """Callable caption -> noun phrases (see the module docstring for the exact steps).

    Args:
        tagger: a tagger callable or a name for :func:`resolve_tagger` (default ``"auto"``).
        web_words: tokens removed before tagging (default :data:`WEB_WORDS`).
        stopwords: a phrase made only of these is dropped (default :data:`STOPWORDS`).
        max_phrases: keep at most this many phrases, the first ones in caption order (paper: 20).
        grammar: the ``nltk.RegexpParser`` grammar; must define an ``NP`` chunk.
    """

    tagger: str | Tagger = "auto"
    web_words: Iterable[str] = WEB_WORDS
    stopwords: Iterable[str] = STOPWORDS
    max_phrases: int = MAX_PHRASES
    grammar: str = NP_GRAMMAR
    tagger_name: str = field(init=False)

    def __post_init__(self):
        if self.max_phrases < 1:
            raise ValueError(f"max_phrases must be >= 1, got {self.max_phrases}")
        from nltk import RegexpParser  # pure regular expressions: needs no NLTK data

        self._tag, self.tagger_name = resolve_tagger(self.tagger)
        self.web_words = frozenset(w.lower() for w in self.web_words)
        self.stopwords = frozenset(w.lower() for w in self.stopwords)
        self._parser = RegexpParser(self.grammar)

    def __call__(self, caption: str) -> list[str]:
        tokens = [t for t in tokenize(caption) if t not in self.web_words]
        if not tokens:
            return []
        tagged = self._tag(tokens)
        if len(tagged) != len(tokens):
            raise ValueError(f"tagger returned {len(tagged)} tags for {len(tokens)} tokens: {tokens}")
        phrases: list[str] = []
        seen: set[str] = set()
        for chunk in self._parser.parse(tagged).subtrees(lambda t: t.label() == "NP"):
            words = [word for word, _ in chunk.leaves()]
            if all(w in self.stopwords or not _WORD_RE.search(w) for w in words):
                continue
            phrase = " ".join(words)
            if phrase in seen:
                continue
            seen.add(phrase)
            phrases.append(phrase)
            if len(phrases) == self.max_phrases:
                break
        return phrases

    def batch(self, captions: Sequence[str]) -> list[list[str]]:
        return [self(c) for c in captions]


def extract_noun_phrases(caption: str, tagger: str | Tagger = "auto", **kwargs) -> list[str]:
    """One-off convenience wrapper around :class:`PhraseExtractor` (build the extractor once for many)."""
    return PhraseExtractor(tagger=tagger, **kwargs)(caption)
