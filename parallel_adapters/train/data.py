"""Tokenised, packed training data with deterministic data-parallel sampling.

Shapes: packed samples are [N, 2, S]: row 0 the input ids, row 1 the labels (the inputs shifted
by one, with LABEL_MASK_VALUE where a label must not count); a micro-batch gives input_ids [B, S]
and labels [B, S].
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

LABEL_MASK_VALUE = -100


class ByteTokenizer:
    """UTF-8 bytes as token ids (vocab 256 + one end-of-document id): no files, no download."""

    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def default_corpus_path() -> Path:
    """The small text corpus that ships with the package (used by the demo and tests)."""
    return Path(str(resources.files("parallel_adapters") / "data" / "corpus.txt"))


def load_texts(paths: Sequence[str | Path]) -> list[str]:
    """Documents from .txt files (one document per file) or .jsonl files (field "text")."""
    texts = []
    for path in map(Path, paths):
        if not path.is_file():
            raise ValueError(f"data path {str(path)!r} does not exist or is not a file")
        try:
            content = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"data file {path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
        if path.suffix == ".jsonl":
            texts.extend(_jsonl_texts(path, content))
        else:
            texts.append(content)
    return texts


def _jsonl_texts(path: Path, content: str) -> Iterator[str]:
    for line_no, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise ValueError(f"{path}:{line_no}: not a JSON line ({type(exc).__name__}: {exc})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{line_no}: each line must be a JSON object with a 'text' field, "
                             f"got a {type(record).__name__}")
        if "text" not in record:
            raise ValueError(f"{path}:{line_no}: a JSON line without a 'text' field")
        if not isinstance(record["text"], str):
            raise ValueError(f"{path}:{line_no}: 'text' must be a string, got a {type(record['text']).__name__}")
        yield record["text"]


def pack(documents: Sequence[Sequence[int]], seq_len: int, eos_id: int) -> torch.Tensor:
    """Concatenate documents (eos after each) and cut into [N, 2, seq_len] (inputs, labels).

    Consecutive samples overlap by one token so that every token is a label exactly once.  The
    label after an eos (the next document's first token) is masked: nothing in the sequence
    predicts it.
    """
    stream: list[int] = []
    for doc in documents:
        stream.extend(doc)
        stream.append(eos_id)
    count = (len(stream) - 1) // seq_len
    if count < 1:
        raise ValueError(f"the data holds {len(stream)} tokens: too few for one sequence of {seq_len}")
    flat = torch.tensor(stream[: count * seq_len + 1], dtype=torch.long)
    inputs, labels = flat[:-1].clone(), flat[1:].clone()
    labels[inputs == eos_id] = LABEL_MASK_VALUE
    return torch.stack([inputs.view(count, seq_len), labels.view(count, seq_len)], dim=1)


@dataclass
class DataPosition:
    """Where the sampler stands: saved with checkpoints for exact resume."""

    epoch: int = 0
    step: int = 0


class DataParallelBatches:
    """Micro-batches for one data-parallel rank: a seeded permutation per epoch, each global batch
    split into disjoint per-rank slices.  Same seed and position -> same batches, on any rank count
    that divides the global batch."""

    def __init__(self, samples: torch.Tensor, micro_batch: int, dp_rank: int, dp_size: int, seed: int,
                 position: DataPosition | None = None):
        if len(samples) < micro_batch * dp_size:
            raise ValueError(f"{len(samples)} samples cannot fill one global batch of "
                             f"{micro_batch} x {dp_size} data-parallel ranks")
        self.samples, self.micro_batch = samples, micro_batch
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.position = position or DataPosition()

    @property
    def steps_per_epoch(self) -> int:
        return len(self.samples) // (self.micro_batch * self.dp_size)

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self.position.step >= self.steps_per_epoch:
            self.position = DataPosition(self.position.epoch + 1, 0)
        order = torch.randperm(len(self.samples), generator=torch.Generator().manual_seed(self.seed + self.position.epoch))
        start = (self.position.step * self.dp_size + self.dp_rank) * self.micro_batch
        chunk = self.samples[order[start: start + self.micro_batch]]
        self.position = DataPosition(self.position.epoch, self.position.step + 1)
        return {"input_ids": chunk[:, 0].contiguous(), "labels": chunk[:, 1].contiguous()}
