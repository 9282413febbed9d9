"""JSON as every role writes it: compact, with no space after `:` or `,`, as upstream's services do.

Upstream's validation scripts read our answers with `grep -o '"name":"[^"]*"'`; a space after the
colon hides every field from them.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

from aiohttp import web

SEPARATORS = (",", ":")


def dumps(data: Any) -> str:
    """`data` as compact JSON text."""
    return json.dumps(data, separators=SEPARATORS)


def json_response(data: Any, *, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    """A JSON response with a compact body (use instead of `web.json_response`)."""
    return web.Response(text=dumps(data), status=status, headers=headers, content_type="application/json")
