"""What the registry accepts in a record: names, addresses, URLs and the metadata fields it gives meaning to.

Checked where requests are handled, before any store sees the record, so every store holds only
records that every reader (router, console, strict JSON parsers) can use.
"""
from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import urlsplit

from ..errors import ApiError

# Letters, digits and . _ - : @ ; starting with a letter, digit or underscore (so never "." or "..").
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._:@-]{0,252}")
NAME_RULE = "1 to 253 characters from A-Z a-z 0-9 . _ - : @, starting with a letter, digit or '_'"
# Host names and addresses: no spaces, controls, slashes or other URL delimiters.
_HOST = re.compile(r"[A-Za-z0-9._:%\[\]-]{0,253}")
_STATUS = re.compile(r"[A-Za-z0-9._-]{1,64}")

WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")   # "the address this registration came from"
MAX_WEIGHT = 1_000_000


def _bad(field: str, why: str) -> ApiError:
    return ApiError(400, f"field '{field}' {why}", code="invalid_field")


def check_name(name: Any, field: str = "name") -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        shown = repr(name)[:80]
        raise _bad(field, f"must be {NAME_RULE}; got {shown}")
    return name


def check_host(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise _bad(field, "must be a string")
    if not _HOST.fullmatch(value):
        raise _bad(field, f"must be a host name or IP address; got {repr(value)[:80]}")
    return value


def check_url(value: Any, field: str) -> str:
    """An http(s) URL with a host and, if given, a port in 1..65535."""
    if not isinstance(value, str):
        raise _bad(field, "must be a string")
    if len(value) > 2048 or any(ord(c) < 33 or ord(c) == 127 for c in value):
        raise _bad(field, f"must be an http(s) URL without spaces or control characters; got {repr(value)[:80]}")
    try:
        u = urlsplit(value)
        port = u.port
    except ValueError as exc:
        raise _bad(field, f"is not a valid URL ({exc}): {value[:80]!r}") from None
    if u.scheme not in ("http", "https"):
        raise _bad(field, f"must be an http:// or https:// URL; got {value[:80]!r}")
    if not u.hostname:
        raise _bad(field, f"has no host: {value[:80]!r}")
    if port is not None and not 1 <= port <= 65535:
        raise _bad(field, f"has port {port}, outside 1..65535")
    if u.username is not None or u.password is not None:
        raise _bad(field, "must not carry a user name or password")
    return value.rstrip("/")


def check_status(value: Any) -> str:
    if not isinstance(value, str) or not _STATUS.fullmatch(value):
        raise _bad("status", f"must be 1 to 64 characters from A-Z a-z 0-9 . _ -; got {repr(value)[:80]}")
    return value


def _string_list(value: Any, field: str) -> None:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _bad(field, "must be a list of strings")


def check_metadata(md: Any, field: str = "metadata") -> dict:
    """The fields the registry gives meaning to must have the right type; other keys are free."""
    if not isinstance(md, dict):
        raise _bad(field, "must be an object")
    for key in ("type", "role", "cache_type", "state", "parent_service"):
        if key in md and md[key] is not None and not isinstance(md[key], str):
            raise _bad(f"{field}.{key}", "must be a string")
    if "models" in md:
        _string_list(md["models"], f"{field}.models")
    if "models_list" in md:
        ml = md["models_list"]
        if not isinstance(ml, list) or not all(isinstance(m, dict) for m in ml):
            raise _bad(f"{field}.models_list", "must be a list of objects")
        for m in ml:
            if "id" in m and not isinstance(m["id"], str):
                raise _bad(f"{field}.models_list[].id", "must be a string")
    if "weight" in md:
        w = md["weight"]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w <= MAX_WEIGHT:
            raise _bad(f"{field}.weight", f"must be a number above 0 and at most {MAX_WEIGHT}; got {repr(w)[:40]}")
    for key in ("url", "babysitter_url"):
        if md.get(key) is not None:
            check_url(md[key], f"{field}.{key}")
    return md


def encoded_size(value: Any, field: str) -> int:
    """Size in bytes of `value` as strict UTF-8 JSON; 400 when it cannot be written strictly."""
    try:
        return len(json.dumps(value, allow_nan=False, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    except UnicodeEncodeError:
        raise _bad(field, "holds text that is not valid Unicode (a lone surrogate)") from None
    except ValueError:
        raise _bad(field, "holds NaN or Infinity, which JSON does not allow") from None


def check_metadata_size(md: dict, limit: int, field: str = "metadata") -> None:
    size = encoded_size(md, field)
    if size > limit:
        raise ApiError(413, f"field '{field}' is {size} bytes as JSON; the limit is {limit}",
                       code="metadata_too_large")


def check_fields(body: dict, *, partial: bool, max_metadata: int) -> dict:
    """Validate register (partial=False) or PUT (partial=True) fields; raise 400/413 naming the field."""
    out: dict[str, Any] = {}
    if not partial:
        for req in ("name", "host", "port"):
            if req not in body:
                raise ApiError(400, f"missing required field: {req}", code="missing_field")
        out["name"] = check_name(body["name"])
    for key in ("host", "hostname"):
        if key in body:
            out[key] = check_host(body[key], key)
    if "url" in body and out.get("host", "x").strip() not in WILDCARD_HOSTS:
        out["url"] = check_url(body["url"], "url")  # with a wildcard host the registry writes the URL
    if "status" in body:
        out["status"] = check_status(body["status"])
    if "port" in body:
        port = body["port"]
        if not isinstance(port, int) or isinstance(port, bool):
            raise _bad("port", "must be an integer")
        if not 1 <= port <= 65535:
            raise _bad("port", f"must be between 1 and 65535, got {port}")
        out["port"] = port
    if "metadata" in body and body["metadata"] is not None:
        out["metadata"] = check_metadata(body["metadata"])
        check_metadata_size(out["metadata"], max_metadata)
    return out


def check_heartbeat(body: dict) -> tuple[str | None, dict | None]:
    """A heartbeat's optional status and metadata to merge."""
    status = metadata = None
    if "status" in body:
        status = check_status(body["status"])
    if "metadata" in body and body["metadata"] is not None:
        metadata = check_metadata(body["metadata"])
        encoded_size(metadata, "metadata")
    return status, metadata
