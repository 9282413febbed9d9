"""A request's prompt as the cache model sees it: chained hashes of fixed-size blocks of its text.

Block i's key is a hash of blocks 0..i, so two prompts share block i's key exactly when they share
their first i+1 blocks: the longest common prefix of two prompts is the number of leading keys
they share. The text is what the engine's chat template renders from, in order: each message's
role and content (non-text parts by their JSON), and the tools and model that change the rendering
before any message, which seed the chain. A final partial block is not keyed.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

_ROLE_MARK = {"system": "\x1cs", "developer": "\x1cd", "user": "\x1cu", "assistant": "\x1ca", "tool": "\x1ct"}


class PromptKey:
    """The block keys of one prompt, its length in characters, and the conversation it names."""

    __slots__ = ("hashes", "chars", "session")

    def __init__(self, hashes: list[int], chars: int, session: str | None) -> None:
        self.hashes = hashes
        self.chars = chars          # characters of the whole text (the partial last block included)
        self.session = session      # prompt_cache_key, the session header or `user`, if any


def content_texts(content: Any) -> list[str]:
    """The text pieces of one message's `content`: a string, or a list of parts with `text`/`content`."""
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        return []
    return [v for p in content if isinstance(p, dict) for k in ("text", "content")
            if isinstance(v := p.get(k), str)]


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return "" if content is None else json.dumps(content, sort_keys=True, default=str)
    out = []
    for part in content:
        text = part.get("text") if isinstance(part, dict) else None
        # An image or audio part changes what the engine sees: it is part of the key, by its JSON.
        out.append(text if isinstance(text, str) else "\x1d" + json.dumps(part, sort_keys=True, default=str))
    return "".join(out)


def prompt_text(data: Mapping[str, Any]) -> str | None:
    """The text a chat or completion request's prompt is rendered from, or None (no prompt)."""
    msgs = data.get("messages")
    if isinstance(msgs, list):
        parts = []
        for m in msgs:
            if isinstance(m, dict):
                role = m.get("role")
                parts.append(_ROLE_MARK.get(role, "\x1c?") if isinstance(role, str) else "\x1c?")
                parts.append(_content_text(m.get("content")))
                calls = m.get("tool_calls")
                if calls:
                    parts.append(json.dumps(calls, sort_keys=True, default=str))
        return "".join(parts)
    prompt = data.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return "\x1e".join(prompt)
    return None


def session_of(data: Mapping[str, Any] | None, headers: Mapping[str, str], header: str) -> str | None:
    """The conversation a request says it continues: `prompt_cache_key`, the session header, `user`."""
    key = data.get("prompt_cache_key") if data is not None else None
    if isinstance(key, str) and key:
        return key
    key = headers.get(header)
    if key:
        return key
    user = data.get("user") if data is not None else None
    return user if isinstance(user, str) and user else None


def prompt_key(data: Mapping[str, Any], model: str, block: int, max_chars: int,
               session: str | None = None) -> PromptKey | None:
    """The PromptKey of a request body, or None when it has no prompt text."""
    text = prompt_text(data)
    if text is None:
        return None
    tools = data.get("tools")
    h = hash((model, json.dumps(tools, sort_keys=True, default=str) if tools else None))
    hashes = []
    end = min(len(text), max_chars)
    for start in range(0, end - block + 1, block):
        h = hash((h, text[start:start + block]))
        hashes.append(h)
    return PromptKey(hashes, len(text), session)


__all__ = ["PromptKey", "content_texts", "prompt_key", "prompt_text", "session_of"]
