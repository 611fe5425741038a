"""Chat: conversations rendered with a model's chat template, and which of their tokens the model
should learn to say.

A chat record holds ``messages``: a list of ``{"role": ..., "content": ...}`` (the convention of
TRL's SFT trainer and torchtune). ``render`` fills the model's Jinja chat template the way
transformers' ``apply_chat_template`` does (a sandboxed environment, ``trim_blocks`` and
``lstrip_blocks``, ``raise_exception`` and ``strftime_now``; the special tokens passed as
``bos_token`` and ``eos_token``). ``assistant_spans`` finds, in the rendered conversation, the
characters of each assistant turn (its content and what the template writes to close it, such as
``<|im_end|>``), as the difference between the conversation rendered up to that turn with the
generation prompt and rendered through it; ``token_mask`` turns them into a per-token loss mask.
A template that renders an earlier turn differently once later turns follow (one that drops the
reasoning of earlier turns) cannot be cut that way, and is refused with the record named.
"""
from __future__ import annotations

import datetime
import functools
from dataclasses import dataclass

import numpy as np
from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .options import short_repr

ROLES_FIELD = "messages"


@dataclass(frozen=True)
class ChatTemplate:
    """A model's chat template with the special tokens it is rendered with."""
    template: str
    bos_token: str = ""
    eos_token: str = ""


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
    def raise_exception(message):
        raise TemplateError(message)

    def strftime_now(fmt):
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise ValueError(f"the chat template is not a valid Jinja template ({e})") from None


def check_messages(messages, where: str) -> list[dict]:
    """``messages`` as a list of ``{"role": str, "content": str}``; a ValueError naming ``where``."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"data: {where}: {ROLES_FIELD!r} must be a non-empty list of messages, got "
                         f"{short_repr(messages)}")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"data: {where}: message {i} must be an object with a string 'role' and a "
                             f"string 'content', got {short_repr(m)}")
    return messages


def render(chat: ChatTemplate, messages: list[dict], add_generation_prompt: bool = False,
           where: str | None = None) -> str:
    """The conversation as the template writes it; ``where`` names the conversation in errors."""

    try:
        return _compiled(chat.template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                               bos_token=chat.bos_token, eos_token=chat.eos_token)
    except TemplateError as e:
        about = f"data: {where}: " if where else ""
        raise ValueError(f"{about}the chat template failed on this conversation: {e}") from None


def assistant_spans(chat: ChatTemplate, messages: list[dict], where: str
                    ) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    text = render(chat, messages, where=where)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(chat, messages[:i], add_generation_prompt=True, where=where)
        through = render(chat, messages[:i + 1], where=where)
        if not (text.startswith(before) and text.startswith(through) and len(before) <= len(through)):
            raise ValueError(f"data: {where}: the chat template renders turn {i} differently once later "
                             "turns follow, so the assistant's tokens cannot be told apart; give such data "
                             "as plain text records instead")
        if len(through) > len(before):
            spans.append((len(before), len(through)))
    return text, spans


def token_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> np.ndarray:
    """[tokens] uint8: 1 for a token whose characters lie in one of ``spans`` (by its first
    character; a token of no characters, by its position)."""
    starts = np.fromiter((a for a, _ in offsets), dtype=np.int64, count=len(offsets))
    mask = np.zeros(len(offsets), dtype=np.uint8)
    for a, b in spans:
        mask[(starts >= a) & (starts < b)] = 1
    return mask
