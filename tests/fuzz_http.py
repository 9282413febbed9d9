"""Hostile HTTP input for fuzz tests of any role: hypothesis strategies for bodies, names and
headers, a raw-socket sender, and the checks every answer must pass (never a 5xx, always the JSON
envelope for an error). Point it at any server: the registry, babysitter and mock tests use it,
and so can the router's."""
from __future__ import annotations

import http.client
import json
import socket
from typing import Any
from urllib.parse import quote

from hypothesis import strategies as st

# -- values ------------------------------------------------------------------------------------
SCALARS = (st.none() | st.booleans() | st.integers(min_value=-(2 ** 70), max_value=2 ** 70)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=24))
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=16)

SPECIAL_NAMES = ["", ".", "..", "a/b", "a\r\nX-Injected: 1", "tab\tname", "sp ace", "x" * 300, "\ud800",
                 "ok-name", "\u202e", "%2e%2e", "null\x00byte", "ünïcode", "router-::1-8000"]
NAMES = st.sampled_from(SPECIAL_NAMES) | st.text(max_size=40)
HOSTS = st.sampled_from(["127.0.0.1", "0.0.0.0", "", "::1", "h\r\n", "a b", "10.0.0.1/x", "x" * 300]) | st.text(max_size=20)
PORTS = st.sampled_from([0, 1, 80, 65535, 65536, -1, True, "80", 1.5, None]) | st.integers()
URLS = st.sampled_from(["http://127.0.0.1:8100", "http://127.0.0.99:99999", "javascript:alert(1)", "ftp://h:21",
                        "http://", "http://u:p@h:1", "https://h", "http://h:0", " http://h:1"]) | st.text(max_size=30)
META_KEYS = st.sampled_from(["type", "models", "models_list", "weight", "cache_type", "url", "babysitter_url",
                             "state", "role", "pid"]) | st.text(max_size=8)
METADATA = st.dictionaries(META_KEYS, JSON_VALUES, max_size=6) | JSON_VALUES
RECORDS = st.fixed_dictionaries(
    {"name": NAMES, "host": HOSTS, "port": PORTS},
    optional={"url": URLS, "hostname": HOSTS, "status": st.sampled_from(["running", "", "x" * 100]) | JSON_VALUES,
              "metadata": METADATA})

RAW_BODIES = st.sampled_from([
    b"", b"{", b"}", b"null", b"[]", b"NaN", b'{"a": NaN}', b'{"a": Infinity}', b'{"a": -Infinity}',
    b"\xff\xfe\x00", b'{"name": "\xc3"}', b"[" * 50000 + b"]" * 50000, b'{"x": ' + b"{\"y\": " * 20000 + b"1" + b"}" * 20001,
    b'{"name": "a", "name": "b", "host": "h", "port": 1}', b"1e999999", b'"\\ud800"',
]) | st.binary(max_size=200)


def encode_json(value: Any) -> bytes:
    """JSON as a hostile client would send it: lone surrogates escaped, not refused."""
    return json.dumps(value, ensure_ascii=True).encode()


BODIES = RECORDS.map(encode_json) | JSON_VALUES.map(encode_json) | RAW_BODIES

AUTH_HEADERS = st.sampled_from(["", "Bearer", "Bearer ", "bearer wrong", "Basic Zm9vOmJhcg==", "Bearer " + "x" * 5000,
                                "BEARER  wrong ", "Bearer tok tok", "Token tok"])


def path_segment(name: str) -> str:
    """A name as one URL path segment (lone surrogates kept as their bytes)."""
    return quote(name.encode("utf-8", "surrogatepass"), safe="")


# -- sending and checking ----------------------------------------------------------------------
def request(host: str, port: int, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """One request on its own connection; returns status, headers (lower-case names) and body."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def send_raw(host: str, port: int, data: bytes, timeout: float = 10.0, quiet: float = 0.5) -> bytes:
    """Write raw bytes and read the first answer: until it is complete, the server closes, or
    nothing more comes for `quiet` seconds (a server still waiting for bytes it was promised)."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except OSError:  # the server may answer and close before reading everything
            pass
        s.settimeout(quiet)
        buf = b""
        try:
            while chunk := s.recv(65536):
                buf += chunk
                if _complete(buf):
                    break
        except (ConnectionResetError, TimeoutError, socket.timeout):
            pass
    return buf


def _complete(buf: bytes) -> bool:
    head, sep, body = buf.partition(b"\r\n\r\n")
    if not sep:
        return False
    if head.startswith(b"HTTP/1.1 100"):
        return _complete(body) if body else False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            try:
                return len(body) >= int(value.strip())
            except ValueError:
                return False
    return False


def check_answer(status: int, headers: dict[str, str], body: bytes, what: str = "") -> Any:
    """No 5xx; an error carries the OpenAI envelope as strict JSON. Returns the parsed body or None."""
    assert status < 500, f"{what}: {status} {body[:300]!r}"
    if status >= 400:
        assert headers.get("content-type", "").startswith("application/json"), f"{what}: {status} {headers}"
        err = strict_json(body)["error"]
        assert isinstance(err["message"], str) and err["message"] and "type" in err, f"{what}: {err}"
        return err
    return None


def check_raw_answer(raw: bytes, what: str = "") -> None:
    """A raw exchange: every response on it is below 500, and each error is the JSON envelope."""
    if not raw:
        return  # the server closed without answering: acceptable for garbage
    if raw.startswith(b"HTTP/1.1 100"):
        raw = raw.partition(b"\r\n\r\n")[2]
        if not raw:
            return
    head = raw.split(b"\r\n", 1)[0]
    assert head.startswith(b"HTTP/"), f"{what}: {raw[:200]!r}"
    status = int(head.split()[1])
    assert status < 500, f"{what}: {raw[:300]!r}"
    if status >= 400:
        headers = raw.split(b"\r\n\r\n", 1)[0].lower()
        assert b"content-type: application/json" in headers, f"{what}: {raw[:300]!r}"


def strict_json(raw: bytes) -> Any:
    """Parse as a strict parser would: valid UTF-8, no NaN or Infinity."""
    def refuse(name: str) -> Any:
        raise AssertionError(f"non-standard JSON constant {name}")
    return json.loads(raw.decode("utf-8", "strict"), parse_constant=refuse)


REQUEST_LINES = st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"G\x00T", b"", b"PRI"]) 
TARGETS = st.sampled_from([b"/", b"/services", b"/health", b"*", b"//..//", b"/%ff", b"http://x/", b"/" + b"a" * 9000])
VERSIONS = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1x", b""])
HEADER_LINES = st.lists(st.sampled_from([
    b"Host: x", b"Content-Length: 5", b"Content-Length: -1", b"Content-Length: 99999999999", b"Content-Length: 1, 2",
    b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip, chunked", b"Expect: 100-continue", b"Expect: nonsense",
    b"Connection: close", b"Authorization: Bearer x", b"X: \x01\x02", b"Bad Header: 1", b": empty", b"X-" + b"a" * 9000 + b": 1",
]) | st.binary(max_size=40).map(lambda b: b.replace(b"\r\n", b"")), max_size=6)
RAW_REQUESTS = st.builds(
    lambda m, t, v, hs, body: m + b" " + t + b" " + v + b"\r\n" + b"".join(h + b"\r\n" for h in hs) + b"\r\n" + body,
    REQUEST_LINES, TARGETS, VERSIONS, HEADER_LINES, st.binary(max_size=64))
