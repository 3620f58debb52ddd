"""OpenAI's CLIP BPE tokenizer, built offline.

No tokenizer can be downloaded at run time on the machines this project targets, but the
``open_clip_torch`` wheel ships OpenAI's BPE merges (``open_clip/bpe_simple_vocab_16e6.txt.gz``).
We only *read* that data file (importing ``open_clip`` needs torchvision, which does not import beside
the CPU torch build) and build the vocabulary exactly as OpenAI's ``SimpleTokenizer`` does:

    256 byte symbols, the same 256 with ``</w>``, one entry per merge, ``<|startoftext|>``,
    ``<|endoftext|>``  ->  49,408 entries.

The result is a standard transformers ``CLIPTokenizer`` (fast, ``tokenizers`` backed): it saves and
reloads with ``AutoTokenizer`` like any hub CLIP tokenizer, and gives the same ids as
``openai/clip-vit-base-patch32``. Like the hub tokenizer it pads with ``<|endoftext|>`` (id 49407),
so a text tower must pool at the *first* end-of-text token (HF CLIP does). The normaliser is HF's
(NFC, collapse whitespace, lower-case); OpenAI additionally runs ``ftfy`` and HTML-unescapes, which only
matters for mojibake or ``&amp;``-style input.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
from pathlib import Path

from transformers import CLIPTokenizer

BPE_FILE = "open_clip/bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
# OpenAI keeps the first 49152 - 256 - 2 merges: with the 256 byte symbols and the 2 special tokens that
# makes 49152; the 256 end-of-word byte symbols bring the vocabulary to 49408.
NUM_MERGES = 49152 - 256 - 2
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

_INSTALL_HINT = (
    "The offline CLIP tokenizer reads OpenAI's BPE merges from the open_clip_torch wheel. Install it "
    "without its dependencies (`pip install --no-deps open_clip_torch`), pass `bpe_path=` to the file "
    "bpe_simple_vocab_16e6.txt.gz, or load a hub tokenizer instead "
    "(`CLIPTokenizer.from_pretrained('openai/clip-vit-base-patch32')`)."
)


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins for raw bytes used by byte-level BPE, in OpenAI's vocabulary order.

    Bytes that are already printable Latin-1 characters stand for themselves and come first; the
    remaining 68 bytes (control characters, space, soft hyphen...) are mapped to code points 256, 257,
    ... in increasing byte order and come after them.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    printable_set = set(printable)
    others = [b for b in range(256) if b not in printable_set]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def find_bpe_file() -> Path:
    """Path of OpenAI's merges file inside the installed open_clip_torch wheel (never imports it)."""
    candidates = []
    try:
        candidates.append(Path(importlib.metadata.distribution("open_clip_torch").locate_file(BPE_FILE)))
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec("open_clip")  # finding a top-level package does not execute it
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / Path(BPE_FILE).name)
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"OpenAI's CLIP BPE file {BPE_FILE} was not found. {_INSTALL_HINT}")


def load_clip_vocab(bpe_path: str | Path | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """``(vocab, merges)`` of OpenAI's CLIP tokenizer, read from the gzipped merges file."""
    path = Path(bpe_path) if bpe_path is not None else find_bpe_file()
    if not path.is_file():
        raise FileNotFoundError(f"CLIP BPE file {path} does not exist. {_INSTALL_HINT}")
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    # line 0 is a version header
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path} is not OpenAI's CLIP merges file (expected {NUM_MERGES} 'a b' merge lines)")
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(
            f"built a CLIP vocabulary of {len(vocab)} entries from {path}, expected {VOCAB_SIZE}"
        )
    return vocab, merges


def build_clip_tokenizer(model_max_length: int = 77, bpe_path: str | Path | None = None) -> CLIPTokenizer:
    """OpenAI's CLIP tokenizer as a transformers ``CLIPTokenizer``, without any hub access.

    Args:
        model_max_length (`int`, defaults to 77): CLIP's context length (start and end tokens included).
        bpe_path (`str` or `Path`, *optional*): the merges file; defaults to the copy inside the
            installed ``open_clip_torch`` wheel.

    Raises:
        FileNotFoundError: the merges file is missing, with installation instructions.
    """
    vocab, merges = load_clip_vocab(bpe_path)
    # transformers 5.x: pass objects, not file paths (paths silently gave a 2-token vocabulary)
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,  # as openai/clip-vit-base-patch32's tokenizer_config.json
        model_max_length=model_max_length,
    )
    if len(tokenizer) != VOCAB_SIZE:
        raise RuntimeError(f"CLIPTokenizer ended up with {len(tokenizer)} tokens, expected {VOCAB_SIZE}")
    return tokenizer
