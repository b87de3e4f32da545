"""Prompt formats (`direct`, `paper`, `chat` with an optional system prompt): how a prompt text becomes token
ids, recorded with every result.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from study.core.errors import UsageError
from study.prompts.sets import PromptSet, _one_line

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase




class PromptFormat(str, enum.Enum):
    """How a prompt text becomes model input; recorded with every result."""

    DIRECT = "direct"
    PAPER = "paper"
    CHAT = "chat"


PAPER_TEMPLATE = "## Query:{q}\n## Answer:"


def parse_format(name: str | PromptFormat) -> PromptFormat:
    if isinstance(name, PromptFormat):
        return name
    try:
        return PromptFormat(str(name).strip().lower())
    except ValueError:
        valid = ", ".join(f.value for f in PromptFormat)
        raise UsageError(f"unknown prompt format {name!r}: valid formats are {valid}") from None


def check_system_prompt(fmt: PromptFormat, system_prompt: str | None) -> None:
    if system_prompt is not None and fmt is not PromptFormat.CHAT:
        raise UsageError(
            f"a system prompt needs the chat format, not {fmt.value!r}: use format chat or drop the system prompt"
        )


def render(text: str, fmt: PromptFormat | str, system_prompt: str | None = None) -> str:
    """The input string for `direct` and `paper`; `chat` is rendered by the tokenizer (use `encode`)."""
    fmt = parse_format(fmt)
    check_system_prompt(fmt, system_prompt)
    if fmt is PromptFormat.DIRECT:
        return text
    if fmt is PromptFormat.PAPER:
        return PAPER_TEMPLATE.format(q=text)
    raise UsageError(
        "format 'chat' is rendered by the tokenizer's chat template: use encode(); render() takes direct, paper"
    )


def encode(
    text: str, fmt: PromptFormat | str, tokenizer: PreTrainedTokenizerBase, system_prompt: str | None = None
) -> list[int]:
    """Token ids of one prompt in the given format, including the tokenizer's default special tokens."""
    fmt = parse_format(fmt)
    check_system_prompt(fmt, system_prompt)
    if fmt is not PromptFormat.CHAT:
        return _as_ids(tokenizer(render(text, fmt))["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__!r} has no chat template, "
            "so format 'chat' is unavailable: valid formats for it are direct, paper"
        )
    messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    messages.append({"role": "user", "content": text})
    try:
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except Exception as exc:  # jinja2 TemplateError (e.g. "system role not supported") and ValueError
        what = "the system prompt" if system_prompt is not None else "the messages"
        raise UsageError(f"the tokenizer's chat template rejected {what}: {_one_line(exc)}") from exc
    return _as_ids(out)


def _as_ids(out: Any) -> list[int]:
    """A plain list[int] from a BatchEncoding/dict, a tensor or a (singly batched) list."""
    if isinstance(out, Mapping):
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    if out and isinstance(out[0], (list, tuple)):
        if len(out) != 1:
            raise ValueError(f"expected one encoded sequence, got a batch of {len(out)}")
        out = out[0]
    return [int(t) for t in out]


def encode_all(
    prompt_set: PromptSet,
    fmt: PromptFormat | str,
    tokenizer: PreTrainedTokenizerBase,
    system_prompt: str | None = None,
) -> list[list[int]]:
    """Token ids of every prompt of a set, in order."""
    fmt = parse_format(fmt)
    return [encode(p.text, fmt, tokenizer, system_prompt) for p in prompt_set.prompts]
