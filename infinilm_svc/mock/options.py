"""The mock backend's settings: who it is, what it serves and how it misbehaves."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MockOptions:
    """Settings of one mock OpenAI backend (the `mock` subcommand's flags)."""

    name: str
    port: int
    models: tuple[str, ...]
    host: str = "127.0.0.1"
    latency: float = 0.0            # seconds before the first token
    chunks: int | None = None       # streamed content chunks; default one per word
    chunk_interval: float = 0.0     # seconds between chunks
    fail_rate: float = 0.0          # fraction of inference requests answered 500
    crash_after: int | None = None  # exit (code 3) on the request after this many
    hang_after: int | None = None   # never answer any request after this many
    die_mid_stream_after: int | None = None  # drop the connection after this many content chunks
    startup_delay: float = 0.0      # seconds before it starts listening
    embedding_dim: int = 16
    slots: int = 0                  # emulate an engine with this many slots and a prompt cache (0: none)
    prefill_ms_per_token: float = 0.0   # with slots: time per uncached prompt token
    no_embeddings: bool = False     # answer 501 to embeddings, as llama-server without --embeddings
    strict_fields: bool = False     # refuse request fields OpenAI does not define (400), as strict servers do
