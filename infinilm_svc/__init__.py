"""infinilm-svc: the control plane for serving LLMs (registry, router, babysitter, mock)."""
from __future__ import annotations

__version__ = "0.1.0"
