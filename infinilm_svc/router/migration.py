"""Request migration: a stream whose backend fails mid-answer is continued on another backend.

While a migratable stream is relayed, only whole SSE events reach the client, and the events sent
are kept (bytes only: nothing is parsed on the way). When the backend fails, the events are parsed
once to learn what the client already has, and the request is sent to another backend with that
text as the start of the answer:

- completions: the prompt followed by the text generated so far;
- chat: the conversation followed by an assistant message holding the partial text, with
  `continue_final_message: true` and `add_generation_prompt: false`;
- `max_tokens` / `max_completion_tokens` reduced by the completion tokens already sent.

The continuation's events are rewritten so the client sees one stream: the first answer's `id`,
`created` and `model`, no second role delta, the continuation's echo of the partial text (as
llama.cpp's server sends it) removed, and a usage chunk that counts both attempts' tokens.
"""
from __future__ import annotations

import json
from typing import Any

from ..wire import dumps

# Paths whose streams may migrate, and what they carry.
KINDS = {"/v1/chat/completions": "chat", "/chat/completions": "chat",
         "/v1/completions": "completion", "/completions": "completion"}
_ERROR_EVENT = b'data: {"error"'


def migratable(path: str, data: dict | None) -> str | None:
    """"chat" or "completion" when a stream of this request may be continued elsewhere, else None.

    Not for `n > 1` (several interleaved answers), `logprobs` (the continuation's would not match
    the tokens already sent), tool calls (a half-sent call cannot be continued as text) or a prompt
    that is not text.
    """
    kind = KINDS.get(path.partition("?")[0])
    if kind is None or data is None or data.get("stream") is not True:
        return None
    if data.get("n") not in (None, 1) or data.get("logprobs") or data.get("top_logprobs"):
        return None
    if kind == "chat":
        if not isinstance(data.get("messages"), list) or data.get("tools") or data.get("functions"):
            return None
    else:
        prompt = data.get("prompt")
        if not (isinstance(prompt, str) or (isinstance(prompt, list) and len(prompt) == 1
                                            and isinstance(prompt[0], str))):
            return None
    return kind


def _event_end(buf: bytes) -> int:
    """Where the last whole SSE event in `buf` ends (0: none yet)."""
    a = buf.rfind(b"\n\n")
    b = buf.rfind(b"\r\n\r\n")
    return max(a + 2 if a >= 0 else 0, b + 4 if b >= 0 else 0)


def _events(raw: bytes) -> list[Any]:
    """The JSON payloads (or the string "[DONE]") of the `data:` lines in `raw`."""
    out: list[Any] = []
    for line in raw.replace(b"\r\n", b"\n").split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            out.append("[DONE]")
            continue
        try:
            out.append(json.loads(payload))
        except ValueError:
            continue
    return out


class Progress:
    """What the client has of an answer, read from the events it was sent."""

    def __init__(self, kind: str, raw: bytes) -> None:
        self.kind = kind
        self.text = ""
        self.tokens = 0            # completion tokens sent (content events, or usage if reported)
        self.head: dict[str, Any] = {}
        self.finished = False      # a finish_reason was sent: nothing is left to continue
        self.tool_calls = False
        usage_tokens = None
        pieces = []
        for ev in _events(raw):
            if not isinstance(ev, dict):
                continue
            if not self.head and "id" in ev:
                self.head = {k: ev[k] for k in ("id", "created", "model") if k in ev}
            usage = ev.get("usage")
            if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
                usage_tokens = usage["completion_tokens"]
            for choice in ev.get("choices") or ():
                if not isinstance(choice, dict):
                    continue
                if choice.get("finish_reason"):
                    self.finished = True
                piece = choice.get("text") if kind == "completion" else (choice.get("delta") or {}).get("content")
                if kind == "chat" and (choice.get("delta") or {}).get("tool_calls"):
                    self.tool_calls = True
                if isinstance(piece, str) and piece:
                    pieces.append(piece)
                    self.tokens += 1
        self.text = "".join(pieces)
        if usage_tokens is not None:
            self.tokens = max(self.tokens, usage_tokens)


def continuation(data: dict, progress: Progress) -> dict | None:
    """The request that continues the answer on another backend, or None if there is nothing to continue."""
    if progress.finished or progress.tool_calls:
        return None
    body = dict(data)
    for key in ("max_tokens", "max_completion_tokens"):
        left = body.get(key)
        if isinstance(left, int) and not isinstance(left, bool):
            if left - progress.tokens <= 0:
                return None
            body[key] = left - progress.tokens
    if progress.kind == "completion":
        prompt = data["prompt"]
        body["prompt"] = (prompt if isinstance(prompt, str) else prompt[0]) + progress.text
    else:
        body["messages"] = [*data["messages"], {"role": "assistant", "content": progress.text}]
        body["continue_final_message"] = True
        body["add_generation_prompt"] = False
    return body


class Transcript:
    """The events of one migratable stream: whole events out, the sent ones kept, errors noticed."""

    __slots__ = ("kind", "sent", "tail", "stitch", "error_event")

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.sent: list[bytes] = []
        self.tail = b""
        self.stitch: Stitch | None = None
        self.error_event = False

    def take(self, data: bytes) -> bytes:
        """The whole events of `data` (after any held-back part) to send to the client."""
        buf = self.tail + data if self.tail else data
        end = _event_end(buf)
        if end < len(buf):
            self.tail = buf[end:]
            buf = buf[:end]
        else:
            self.tail = b""
        if not buf:
            return b""
        if _ERROR_EVENT in buf:           # the backend reports a failure in the stream itself
            i = buf.find(_ERROR_EVENT)
            self.error_event = True
            buf = buf[:i]
        if self.stitch is not None and buf:
            buf = self.stitch.rewrite(buf)
        if buf:
            self.sent.append(buf)
        return buf

    def progress(self) -> Progress:
        return Progress(self.kind, b"".join(self.sent))

    def continue_with(self, progress: Progress) -> None:
        """From now on the events come from a continuation: rewrite them to fit the first answer."""
        self.tail = b""
        self.error_event = False
        self.stitch = Stitch(self.kind, progress)


class Stitch:
    """Rewrites a continuation's events so that they read as the rest of the first answer."""

    def __init__(self, kind: str, progress: Progress) -> None:
        self.kind = kind
        self.head = progress.head
        self.tokens_before = progress.tokens
        self.echo = progress.text     # an engine may repeat the partial text first; dropped once seen
        self.echo_checked = not progress.text

    def rewrite(self, raw: bytes) -> bytes:
        out = []
        for ev in _events(raw):
            if ev == "[DONE]":
                out.append(b"data: [DONE]\n\n")
                continue
            if not isinstance(ev, dict):
                continue
            ev.update(self.head)
            keep = bool(ev.get("usage")) or not ev.get("choices")
            for choice in ev.get("choices") or ():
                if not isinstance(choice, dict):
                    continue
                if self.kind == "chat":
                    delta = choice.get("delta")
                    if isinstance(delta, dict):
                        delta.pop("role", None)
                        if "content" in delta:
                            delta["content"] = self._strip_echo(delta["content"])
                        if delta.get("content") or any(k != "content" for k in delta) or choice.get("finish_reason"):
                            keep = True
                else:
                    choice["text"] = self._strip_echo(choice.get("text"))
                    if choice["text"] or choice.get("finish_reason"):
                        keep = True
            usage = ev.get("usage")
            if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
                usage["completion_tokens"] += self.tokens_before
                if isinstance(usage.get("total_tokens"), int):
                    usage["total_tokens"] += self.tokens_before
            if keep:
                out.append(b"data: " + dumps(ev).encode() + b"\n\n")
        return b"".join(out)

    def _strip_echo(self, piece: Any) -> Any:
        if self.echo_checked or not isinstance(piece, str) or not piece:
            return piece
        self.echo_checked = True
        return piece[len(self.echo):] if piece.startswith(self.echo) else piece


__all__ = ["KINDS", "Progress", "Stitch", "Transcript", "continuation", "migratable"]
