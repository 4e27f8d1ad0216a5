"""Tiny, local stand-ins for the training tests: a random BERT text encoder and a random tiny VAE.

Nothing is downloaded: the BERT is built from a `BertConfig` and a written `vocab.txt`.
"""

from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from transformers import BertConfig, BertModel, BertTokenizer

from nanoi2v_diffusers.models import VAE_PRESETS, AutoencoderKLNanoI2V

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Every word of the shapes captions (DESIGN.md section 6), so captions do not tokenize to [UNK].
CAPTION_WORDS = (
    "a the red green blue yellow cyan magenta white circle square triangle moves stays still left right up down "
    "and to while slowly quickly ,"
).split()
TINY_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=64)  # fmt: skip


def write_tiny_bert(folder: Path, seed: int = 0) -> Path:
    """A random 2-layer BERT (hidden 32) and its tokenizer, saved with `save_pretrained` (safetensors)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL_TOKENS + CAPTION_WORDS) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(str(vocab))
    torch.manual_seed(seed)
    model = BertModel(BertConfig(vocab_size=len(SPECIAL_TOKENS) + len(CAPTION_WORDS), **TINY_BERT))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_tiny_vae(folder: Path, seed: int = 0) -> Path:
    """A random "tiny" VAE (4 latent channels, 8x spatial, 4x temporal compression), saved."""
    torch.manual_seed(seed)
    AutoencoderKLNanoI2V(**VAE_PRESETS["tiny"]).save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models run on one thread: with both cores busy, two OpenMP threads made the tiny VAE's
    convolutions about 60x slower here (spin-waiting), and one thread is as fast when idle."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Forget the process-wide accelerate state after each in-process run (as accelerate's own test
    cases do), so that the next run may use another mixed precision."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
