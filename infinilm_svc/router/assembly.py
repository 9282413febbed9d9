"""A non-streamed answer built from the stream the engine was asked for instead.

An engine notices a client that has gone only when it next writes to it: for a non-streamed answer
that is at the end, so it generates the whole answer for nobody. The router therefore asks the
engine for a stream and assembles the answer the client asked for from it (the same JSON an
engine sends: `choices` with the message or text, `finish_reason`, `usage`, and whatever else the
engine adds, such as llama-server's `timings`), closing the stream at once if the client leaves.
It also gives a non-streamed request a time to first token.
"""
from __future__ import annotations

import json
from typing import Any

_SKIP = frozenset({"choices", "object"})


class StreamError(Exception):
    """The stream carried an error event instead of (the rest of) an answer."""

    def __init__(self, event: dict) -> None:
        super().__init__(str(event.get("error", event))[:300])
        self.event = event


class _Choice:
    __slots__ = ("index", "role", "content", "reasoning", "refusal", "tools", "text", "logprobs", "finish",
                 "extra")

    def __init__(self, index: int) -> None:
        self.index = index
        self.role = "assistant"
        self.content: list[str] | None = None
        self.reasoning: list[str] | None = None
        self.refusal: list[str] | None = None
        self.tools: dict[int, dict] = {}
        self.text: list[str] = []
        self.logprobs: Any = None
        self.finish: Any = None
        self.extra: dict[str, Any] = {}


class Assembler:
    """Feeds on a stream's bytes; `answer()` is the non-streamed answer they make."""

    def __init__(self, chat: bool) -> None:
        self.chat = chat
        self.buf = b""
        self.top: dict[str, Any] = {}
        self.choices: dict[int, _Choice] = {}
        self.events = 0
        self.done = False

    def feed(self, data: bytes) -> None:
        """Take the next bytes of the stream (events may be cut anywhere)."""
        self.buf += data
        while True:
            end = self.buf.find(b"\n\n")
            if end < 0:
                return
            event, self.buf = self.buf[:end], self.buf[end + 2:]
            for line in event.split(b"\n"):
                line = line.rstrip(b"\r")
                if line.startswith(b"data:"):
                    self._event(line[5:].strip())

    def _event(self, payload: bytes) -> None:
        if payload == b"[DONE]":
            self.done = True
            return
        if not payload:
            return
        chunk = json.loads(payload)
        if not isinstance(chunk, dict):
            return
        if "error" in chunk and "choices" not in chunk:
            raise StreamError(chunk)
        self.events += 1
        for k, v in chunk.items():
            if k not in _SKIP:
                self.top[k] = v
        for c in chunk.get("choices") or ():
            if isinstance(c, dict):
                self._choice(c)

    def _choice(self, c: dict) -> None:
        i = c.get("index", 0)
        ch = self.choices.get(i)
        if ch is None:
            ch = self.choices[i] = _Choice(i)
        if c.get("finish_reason") is not None:
            ch.finish = c["finish_reason"]
        lp = c.get("logprobs")
        if lp is not None:
            if isinstance(lp, dict) and isinstance(ch.logprobs, dict):
                for key, part in lp.items():
                    if isinstance(part, list) and isinstance(ch.logprobs.get(key), list):
                        ch.logprobs[key].extend(part)
                    else:
                        ch.logprobs[key] = part
            else:
                ch.logprobs = lp
        if not self.chat:
            if isinstance(c.get("text"), str):
                ch.text.append(c["text"])
            return
        delta = c.get("delta") or {}
        if not isinstance(delta, dict):
            return
        if isinstance(delta.get("role"), str):
            ch.role = delta["role"]
        for key, attr in (("content", "content"), ("reasoning_content", "reasoning"), ("refusal", "refusal")):
            piece = delta.get(key)
            if isinstance(piece, str):
                got = getattr(ch, attr)
                if got is None:
                    setattr(ch, attr, [piece])
                else:
                    got.append(piece)
        for tc in delta.get("tool_calls") or ():
            if not isinstance(tc, dict):
                continue
            t = ch.tools.setdefault(tc.get("index", len(ch.tools)), {"function": {"name": "", "arguments": ""}})
            for key in ("id", "type"):
                if tc.get(key) is not None:
                    t[key] = tc[key]
            fn = tc.get("function") or {}
            if isinstance(fn.get("name"), str):
                t["function"]["name"] += fn["name"]
            if isinstance(fn.get("arguments"), str):
                t["function"]["arguments"] += fn["arguments"]
        for key, v in delta.items():
            if key not in ("role", "content", "reasoning_content", "refusal", "tool_calls"):
                ch.extra[key] = v

    def answer(self) -> dict[str, Any]:
        """The non-streamed answer (`chat.completion` or `text_completion`)."""
        choices = []
        for i in sorted(self.choices):
            ch = self.choices[i]
            if self.chat:
                message: dict[str, Any] = {"role": ch.role,
                                           "content": "".join(ch.content) if ch.content is not None else
                                           (None if ch.tools else "")}
                if ch.reasoning is not None:
                    message["reasoning_content"] = "".join(ch.reasoning)
                if ch.refusal is not None:
                    message["refusal"] = "".join(ch.refusal)
                if ch.tools:
                    message["tool_calls"] = [{"type": "function", **ch.tools[k]} for k in sorted(ch.tools)]
                message.update(ch.extra)
                out: dict[str, Any] = {"finish_reason": ch.finish, "index": i, "message": message}
                if ch.logprobs is not None:
                    out["logprobs"] = ch.logprobs
            else:
                out = {"text": "".join(ch.text), "index": i, "logprobs": ch.logprobs, "finish_reason": ch.finish}
            choices.append(out)
        answer: dict[str, Any] = {"choices": choices}
        answer.update(self.top)
        answer["object"] = "chat.completion" if self.chat else "text_completion"
        return answer


def stream_body(data: dict) -> bytes:
    """The request as the engine is asked it: a stream with its usage at the end."""
    options = data.get("stream_options")
    options = {**options, "include_usage": True} if isinstance(options, dict) else {"include_usage": True}
    return json.dumps({**data, "stream": True, "stream_options": options}).encode()


__all__ = ["Assembler", "StreamError", "stream_body"]
