import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

EOS = 49407


def make_token_ids(batch: int, length: int = 8, seed: int = 0, vocab: int = 1000) -> torch.Tensor:
    """Random valid CLIP token ids ending with the EOS token (the text tower pools there)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=gen)
    ids[:, 0] = 49406
    ids[:, -1] = EOS
    return ids


@pytest.fixture
def tiny_model():
    import cloc_hf

    torch.manual_seed(0)
    return cloc_hf.create_model("cloc-tiny").eval()
