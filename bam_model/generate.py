"""Text generation: load any model ``bam`` reads together with its tokenizer, and continue a prompt."""
from __future__ import annotations

import time

import torch

from .chat import ChatTemplate, render
from .formats import from_pretrained, gguf_reader, is_gguf, load_gguf
from .model import CausalLM
from .tokenizer import DOCUMENT_END_TOKENS, TextTokenizer, check_fits, eos_token_id, read_tokenizer


def load_model_and_tokenizer(path: str, tokenizer: str | None = None, dtype: torch.dtype | None = None,
                             device="cpu") -> tuple[CausalLM, TextTokenizer]:
    """Any model ``bam`` reads (our folder, dense or mixture; a Hugging Face folder; a GGUF file)
    and the tokenizer it carries (``tokenizer``, a tokenizer.json path, overrides it)."""
    given = read_tokenizer(tokenizer) if tokenizer is not None else None  # refused before the slow part
    model = load_gguf(gguf_reader(path), dtype or torch.float32, device) if is_gguf(path) else \
        from_pretrained(path, dtype, device)
    c = model.config
    if given is not None:
        check_fits(given, c)
        model.tokenizer = given
    if model.tokenizer is None:
        raise ValueError(f"{path!r} holds no tokenizer.json and its vocabulary ({c.vocab_size} tokens) is "
                         "not the bundled BPE's; pass the model's tokenizer.json with --tokenizer")
    eos = c.eos_token_id
    if eos is None and any(model.tokenizer.token_to_id(t) is not None for t in DOCUMENT_END_TOKENS):
        eos = eos_token_id(model.tokenizer)
    return model, TextTokenizer(model.tokenizer, eos)


def generate_text(model: CausalLM, tok: TextTokenizer, prompt: str, max_new_tokens: int = 64,
                  temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                  stats: dict | None = None, chat: bool = False) -> str:
    """The prompt and its continuation, decoded together (so that spacing is the tokenizer's), up to
    the end-of-text token. ``chat``: the prompt is a user's message, rendered with the model's chat
    template (``model.chat_template``) and answered; the answer alone is returned, up to the end of
    the assistant's turn. ``stats`` (a dict) receives ``new_tokens`` and ``seconds`` of the generation."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"prompt is not valid Unicode text (a lone surrogate at character "
                         f"{e.start})") from None
    eos = tok.eos_token_id
    if chat:
        template = chat_template_of(model, tok)
        text = render(template, [{"role": "user", "content": prompt}], add_generation_prompt=True)
        ids = tok.tokenizer.encode(text, add_special_tokens=False).ids   # the template spells its specials
        end = tok.tokenizer.token_to_id(template.eos_token) if template.eos_token else None
        eos = end if end is not None else eos
    else:
        ids = tok.encode(prompt)
    if not ids:
        raise ValueError("prompt is empty after tokenization")
    generator = torch.Generator(device=model.device).manual_seed(seed) if seed is not None else None
    input_ids = torch.tensor([ids], device=model.device)
    start = time.perf_counter()
    new = model.generate(input_ids, max_new_tokens, temperature=temperature, top_p=top_p,
                         eos_token_id=eos, generator=generator)[0, len(ids):].tolist()
    if stats is not None:
        stats.update(new_tokens=len(new), seconds=time.perf_counter() - start)
    if eos is not None and eos in new:
        new = new[:new.index(eos)]
    if chat:
        return tok.tokenizer.decode(new, skip_special_tokens=True)
    return tok.decode(ids + new)


def chat_template_of(model: CausalLM, tok: TextTokenizer) -> ChatTemplate:
    """The model's chat template with its special tokens as the tokenizer spells them."""
    if not getattr(model, "chat_template", None):
        raise ValueError("the model has no chat template (its folder holds no chat_template.jinja and its "
                         "tokenizer_config.json none; a GGUF file none): generate without --chat")
    c = model.config

    def spelled(token_id) -> str:
        return (tok.tokenizer.id_to_token(token_id) or "") if isinstance(token_id, int) else ""
    return ChatTemplate(model.chat_template, spelled(getattr(c, "bos_token_id", None)),
                        spelled(getattr(c, "eos_token_id", None)))
