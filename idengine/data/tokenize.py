"""Step 3c, tokenize: cleaned sequence -> Nucleotide Transformer 6-mer token ids, plus the collate fn for training.

`tokenize_batch` is the function Ray Data `map_batches` calls (see `data/ray_tokenize.py`); `collate` pads a batch
of ragged ids for the model. Both are plain numpy/torch so they can be tested without a cluster.
"""

from __future__ import annotations

import itertools
import logging
import tempfile
import weakref
from pathlib import Path

import numpy as np
import torch

from idengine.layout import ID, INPUT_IDS, LABEL, N_TOKENS, SEQUENCE, TRUNCATED
from idengine.config import TINY_BACKBONE

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<unk>", "<pad>", "<mask>", "<cls>")
KMER = 6
CLS_ID = 3
PAD_ID = 1
FIRST_KMER_ID = len(SPECIAL_TOKENS)  # AAAAAA
FIRST_BASE_ID = FIRST_KMER_ID + 4**KMER  # A T C G N: 4100-4104
NT_VOCAB_SHA256 = "f1b544e27897936b50bbd925850fa8a08b421c33bb9c26e3711c140c061d0d4c"
"""sha256 of InstaDeepAI's published vocab.txt (4107 lines joined by newlines, no trailing newline)."""

_BASES = "ATCG"  # NT's 6-mer order is itertools.product("ATCG"), so A=0, T=1, C=2, G=3 in base 4
# Byte -> code: A T C G -> 0-3, N -> 4, anything else -> 5 (rejected: not cleaned); 6 marks a sequence start.
_CODE = np.full(256, 5, dtype=np.int32)
for _i, _b in enumerate(_BASES + "N"):
    _CODE[ord(_b)] = _i
_PROBE = "ACGTACGTNNACGTACGTACGTAC"  # N run, a 6-mer grid restart and single-base leftovers
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> is it NT's? (the check takes ms)


def nt_vocab() -> list[str]:
    """The 4107-token Nucleotide Transformer vocabulary, in id order, built in code (no download).

    Returns:
        `<unk> <pad> <mask> <cls>`, the 4096 6-mers in `itertools.product("ATCG", repeat=6)` order,
        `A T C G N`, `<eos> <bos>`.
    """
    kmers = ["".join(p) for p in itertools.product(_BASES, repeat=KMER)]
    return [*SPECIAL_TOKENS, *kmers, *_BASES, "N", "<eos>", "<bos>"]


def write_offline_tokenizer(out_dir: str | Path) -> Path:
    """Write the NT tokenizer (vocab.txt + tokenizer_config.json) that `from_pretrained` can load offline.

    Args:
        out_dir: directory to write into (created if needed).

    Returns:
        out_dir as a Path.
    """
    from transformers import EsmTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = Path(tmp) / "vocab.txt"
        vocab_file.write_text("\n".join(nt_vocab()), encoding="utf-8")
        EsmTokenizer(str(vocab_file), eos_token=None, model_max_length=1000).save_pretrained(str(out))
    return out


def load_tokenizer(name_or_dir: str, revision: str | None = None, trust_remote_code: bool = False):
    """The tokenizer of a backbone: a hub id, a local directory, or `tiny` (the NT vocab built offline).

    Args:
        name_or_dir: hub id (e.g. InstaDeepAI/nucleotide-transformer-2.5b-multi-species), local dir, or `tiny`.
        revision: hub revision to pin (ignored for `tiny` and local dirs).
        trust_remote_code: let transformers run code shipped with the checkpoint.

    Returns:
        A transformers tokenizer (EsmTokenizer for NT checkpoints).
    """
    from transformers import AutoTokenizer

    if name_or_dir == TINY_BACKBONE:
        with tempfile.TemporaryDirectory() as tmp:
            return AutoTokenizer.from_pretrained(str(write_offline_tokenizer(tmp)))
    return AutoTokenizer.from_pretrained(name_or_dir, revision=revision, trust_remote_code=trust_remote_code)


def _ranges(starts: np.ndarray, counts: np.ndarray, step: int = 1) -> np.ndarray:
    """Concatenation of `starts[i] + step * arange(counts[i])` over i, without a Python loop."""
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(starts, counts) + step * offsets


def _token_stream(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions and ids of the tokens NT's greedy rule emits over a batch's codes (separators: code 6 -> CLS).

    Within each run of ACGT a token starts every 6 bases while 6 remain; the leftover bases become single-base
    tokens; every N is its own token (and ends the run, so the 6-mer grid restarts after it).
    """
    is_base = (codes < 4).view(np.int8)
    edges = np.diff(is_base, prepend=np.int8(0), append=np.int8(0))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    n_kmers = (ends - starts) // KMER
    kmer_at = _ranges(starts, n_kmers, step=KMER)
    single_at = _ranges(starts + KMER * n_kmers, ends - starts - KMER * n_kmers)
    other_at = np.flatnonzero(codes >= 4)  # N and the separators
    ids = np.empty(len(codes), dtype=np.int32)
    ids[single_at] = FIRST_BASE_ID + codes[single_at]
    ids[other_at] = np.where(codes[other_at] == 4, FIRST_BASE_ID + 4, CLS_ID)
    value = np.zeros(len(kmer_at), dtype=np.int32)
    for j in range(KMER):  # base-4 value of the 6 bases from each 6-mer start
        value = value * 4 + codes[kmer_at + j]
    ids[kmer_at] = FIRST_KMER_ID + value
    emit = np.zeros(len(codes), dtype=bool)
    emit[kmer_at] = emit[single_at] = emit[other_at] = True
    at = np.flatnonzero(emit)
    return at, ids[at]


def nt_token_ids(sequences: list[str] | np.ndarray, record_ids: np.ndarray | None = None) -> list[np.ndarray]:
    """NT token ids (CLS first, no truncation) of cleaned sequences, vectorised over the batch.

    Gives the same ids as the transformers EsmTokenizer with the NT vocabulary (tests check it on real data).

    Args:
        sequences: upper-case sequences over A, C, G, T, N.
        record_ids: ids used in the error message, if any.

    Returns:
        One int32 array per sequence.

    Raises:
        ValueError: a sequence holds another character (it was not cleaned by `data/clean.py`).
    """
    if len(sequences) == 0:
        return []
    # Every sequence is preceded by a separator byte that becomes its CLS token and ends any run before it.
    joined = ("\0" + "\0".join(sequences)).encode("ascii", errors="replace")
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    separators = np.cumsum(lengths + 1) - lengths - 1
    codes = _CODE[np.frombuffer(joined, dtype=np.uint8)]
    codes[separators] = 6
    if (codes == 5).any():
        seq_no = int(np.searchsorted(separators, int(np.argmax(codes == 5)), side="right")) - 1
        name = record_ids[seq_no] if record_ids is not None else f"#{seq_no} of the batch"
        raise ValueError(
            f"sequence of record {name} holds a character other than A, C, G, T, N; clean the records first "
            "(idengine prepare does: upper-case, U->T, IUPAC codes->N, gaps removed)"
        )
    at, ids = _token_stream(codes)
    return np.split(ids, np.searchsorted(at, separators[1:]))


def _is_nt_tokenizer(tokenizer) -> bool:
    """True when the tokenizer gives NT's ids, so the vectorised path may replace it (vocab + a probe, cached)."""
    try:
        return _CHECKED[tokenizer]
    except (KeyError, TypeError):
        pass
    vocab = nt_vocab()
    same = len(tokenizer) == len(vocab) and tokenizer.convert_tokens_to_ids(vocab) == list(range(len(vocab)))
    same = same and list(tokenizer(_PROBE)["input_ids"]) == nt_token_ids([_PROBE])[0].tolist()
    try:
        _CHECKED[tokenizer] = same
    except TypeError:
        pass
    return same


def tokenize_batch(batch: dict[str, np.ndarray], tokenizer, max_tokens: int) -> dict[str, np.ndarray]:
    """Add token ids to a batch of cleaned sequences (the `map_batches` function, batch_format="numpy").

    Sequences longer than `max_tokens` tokens keep their FIRST `max_tokens` tokens (CLS included): a barcode's
    primer-proximal start is its best-read, most comparable part. Alternatives would be a centre crop or several
    windows whose logits are averaged; both cost more and need every caller to agree. `truncated` records the cut.

    Args:
        batch: column name -> array; needs `sequence` (upper-case A, C, G, T, N). Other columns pass through.
        tokenizer: a transformers tokenizer; NT's vocabulary takes a vectorised path with identical ids.
        max_tokens: tokens kept per sequence, CLS included (at most 1000 for NT).

    Returns:
        The batch plus `input_ids` (object array of int32 arrays, CLS first, unpadded), `n_tokens` (int32)
        and `truncated` (bool).
    """
    sequences = [str(s) for s in batch[SEQUENCE]]
    if _is_nt_tokenizer(tokenizer):
        full = nt_token_ids(sequences, batch.get(ID))
    else:
        encoded = tokenizer(sequences, add_special_tokens=True)["input_ids"]
        full = [np.asarray(ids, dtype=np.int32) for ids in encoded]
    input_ids = np.empty(len(full), dtype=object)
    input_ids[:] = [ids[:max_tokens] for ids in full]
    out = dict(batch)
    out[INPUT_IDS] = input_ids
    out[N_TOKENS] = np.fromiter((min(len(ids), max_tokens) for ids in full), dtype=np.int32, count=len(full))
    out[TRUNCATED] = np.fromiter((len(ids) > max_tokens for ids in full), dtype=bool, count=len(full))
    return out


def collate(batch: dict[str, np.ndarray], pad_id: int, label_column: str = LABEL) -> dict[str, torch.Tensor]:
    """Pad a batch of ragged token ids to its longest row (dynamic padding) for the model.

    Args:
        batch: needs `input_ids` (object array of int arrays, or a 2-D array); `label_column` if present.
        pad_id: the tokenizer's pad id (1 for NT); NT's position ids skip it, so padding does not shift positions.
        label_column: column of int class labels.

    Returns:
        `input_ids` (long, B x L), `attention_mask` (long, 1 on real tokens), and `labels` (long, B) when the
        label column exists.
    """
    rows = [np.asarray(r) for r in batch[INPUT_IDS]]
    width = max((len(r) for r in rows), default=0)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.from_numpy(row.astype(np.int64))
        attention_mask[i, : len(row)] = 1
    out = {"input_ids": input_ids, "attention_mask": attention_mask}
    if label_column in batch:
        out["labels"] = torch.as_tensor(np.asarray(batch[label_column]).astype(np.int64))
    return out
