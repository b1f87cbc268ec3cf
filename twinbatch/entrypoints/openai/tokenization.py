"""POST /tokenize, POST /detokenize, GET /tokenizer_info: vLLM's remote-tokenizer protocol (lm-eval's
`tokenizer_backend=remote` uses exactly these)."""

from __future__ import annotations

from typing import Any

from twinbatch.entrypoints.openai.protocol import DetokenizeRequest, OpenAIError, TokenizeRequest
from twinbatch.entrypoints.openai.serving_chat import OpenAIServingChat


def _tokenizer(serving: OpenAIServingChat) -> Any:
    if serving.tokenizer is None:
        raise OpenAIError("this model has no tokenizer files; it takes and returns token ids only")
    return serving.tokenizer


def tokenize(serving: OpenAIServingChat, req: TokenizeRequest) -> dict[str, Any]:
    """A prompt (special tokens added by default) or chat messages through the chat template (none added)."""
    serving.check_model(req.model)
    tokenizer = _tokenizer(serving)
    if (req.prompt is None) == (req.messages is None):
        raise OpenAIError("give exactly one of prompt and messages", param="prompt")
    if req.messages is not None:
        text, add_special = serving.apply_chat_template(req.messages, req.add_generation_prompt), False
    else:
        text, add_special = req.prompt, True
    add_special = add_special if req.add_special_tokens is None else req.add_special_tokens
    tokens = tokenizer.encode(text, add_special_tokens=add_special)
    return {
        "count": len(tokens),
        "max_model_len": serving.max_model_len,
        "tokens": tokens,
        "token_strs": tokenizer.convert_ids_to_tokens(tokens) if req.return_token_strs else None,
    }


def detokenize(serving: OpenAIServingChat, req: DetokenizeRequest) -> dict[str, str]:
    serving.check_model(req.model)
    tokenizer = _tokenizer(serving)
    vocab_size = serving.engine.config.model.vocab_size
    bad = [t for t in req.tokens if not 0 <= t < vocab_size]
    if bad:
        raise OpenAIError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})", param="tokens")
    return {"prompt": tokenizer.decode(req.tokens)}


def tokenizer_info(serving: OpenAIServingChat) -> dict[str, Any]:
    tokenizer = _tokenizer(serving)
    return {
        "tokenizer_class": type(tokenizer).__name__,
        "eos_token": tokenizer.eos_token,
        "bos_token": tokenizer.bos_token,
        "pad_token": tokenizer.pad_token,
        "unk_token": tokenizer.unk_token,
        "chat_template": serving.chat_template,
        "model_max_length": serving.max_model_len,
        "vocab_size": serving.engine.config.model.vocab_size,  # the token ids the model accepts
    }
