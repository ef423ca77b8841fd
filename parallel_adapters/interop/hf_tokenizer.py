"""A Hugging Face tokenizer as the training data pipeline needs it (transformers stays in interop/)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable


def load_hf_tokenizer(directory: str | Path) -> tuple[Callable[[str], list[int]], int, int]:
    """(encode without special tokens, eos id, vocabulary size incl. added tokens) of the tokenizer
    saved in `directory` (a model directory); ValueError naming it when there is none or no eos."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as exc:
        raise ValueError(f"data.tokenizer='hf': no usable tokenizer in {directory} ({exc})") from None
    if tok.eos_token_id is None:
        raise ValueError(f"data.tokenizer='hf': the tokenizer in {directory} has no eos token")
    return (lambda text: tok.encode(text, add_special_tokens=False)), tok.eos_token_id, len(tok)


def tokenize_prompt_text(text: str, tokenizer_name_or_path: str | Path, tokenizer_kwargs: dict | None = None) -> list[int]:
    """The ids PEFT's prompt-tuning TEXT init embeds: `tokenizer(text)["input_ids"]` (special
    tokens included, as PEFT), for PromptTuningConfig.init_token_ids.  trust_remote_code is
    dropped, as PEFT drops it."""
    from transformers import AutoTokenizer

    kwargs = {k: v for k, v in (tokenizer_kwargs or {}).items() if k != "trust_remote_code"}
    return list(AutoTokenizer.from_pretrained(str(tokenizer_name_or_path), **kwargs)(text)["input_ids"])
