"""The router's data plane against clients and backends that misbehave: slow readers, odd headers,
malformed answers, clients that hang up at the very end, and the model lookup of the OpenAI SDK."""
from __future__ import annotations

import asyncio
import json
import socket

import aiohttp
import pytest

from harness import async_wait_for, free_port
from router_harness import HOST, Deployment, dep  # noqa: F401 (dep: a fixture)


async def backend_stats(dep: Deployment, name: str) -> dict:
    _, stats, _ = await dep.get("/stats")
    return next(s for s in stats["services"] if s["name"] == name)


async def raw_backend(answer) -> tuple[asyncio.AbstractServer, int, dict]:
    """A backend on a raw socket: reads each request head and body, then runs `answer(writer, state)`."""
    state: dict = {"requests": [], "progress": 0.0}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length) if length else b""
                state["requests"].append((head, body))
                if await answer(writer, state) is False:
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
    port = free_port()
    server = await asyncio.start_server(handle, HOST, port)
    return server, port, state


def chat(stream: bool = False) -> dict:
    return {"model": "m", "stream": stream, "messages": [{"role": "user", "content": "hi"}]}


# -- a slow client is never the backend's fault ------------------------------------------------------
async def test_a_client_that_stops_reading_past_read_timeout_does_not_eject_the_backend(dep):
    """The router pauses reading at its high-water mark while the client is slow; the idle watchdog
    must not count that time against the backend."""
    event = b"data: " + json.dumps({"choices": [{"delta": {"content": "x" * 4000}}]}).encode() + b"\n\n"
    total_events = 6000  # about 24 MB: far more than the socket buffers and the router's high-water mark

    async def stream(writer: asyncio.StreamWriter, state: dict):
        loop = asyncio.get_running_loop()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        frame = b"%x\r\n%s\r\n" % (len(event), event)
        for _ in range(total_events):
            writer.write(frame)
            await writer.drain()
            state["progress"] = loop.time()
        done = b"data: [DONE]\n\n"
        writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
        await writer.drain()
        state["finished"] = True

    server, port, state = await raw_backend(stream)
    try:
        await dep.register("slowpoke-backend", port, ["m"])
        await dep.start_router(read_timeout=1.0, eject_after_failures=1, health_interval=300)
        await dep.wait_routable(1)
        host, rport = dep.router_url.removeprefix("http://").split(":")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, (host, int(rport)))
        body = json.dumps(chat(stream=True)).encode()
        await loop.sock_sendall(sock, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                      b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        await async_wait_for(lambda: state["progress"] > 0, timeout=10, what="the backend to start streaming")

        async def stalled_long_enough():
            # The condition under test: the backend has been held up by back-pressure (our client not
            # reading) for well over read_timeout.
            return not state.get("finished") and loop.time() - state["progress"] > 2.5
        await async_wait_for(stalled_long_enough, timeout=30, interval=0.1, what="back-pressure for 2.5 s")
        received = bytearray()
        while True:
            data = await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), 30)
            if not data:
                break
            received += data
        sock.close()
        assert received.startswith(b"HTTP/1.1 200")
        assert b"data: [DONE]" in received and b"upstream_stream_error" not in received
        s = await backend_stats(dep, "slowpoke-backend")
        assert s["errors"] == {} and s["circuit"] == "closed", s
    finally:
        server.close()



# -- request headers that are not latin-1 ------------------------------------------------------------
async def test_a_non_latin1_request_header_is_forwarded_as_bytes_not_a_500(dep):
    async def ok(writer: asyncio.StreamWriter, state: dict):
        body = b'{"choices": [{"message": {"content": "fine"}}]}'
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()

    server, port, state = await raw_backend(ok)
    try:
        await dep.register("b", port, ["m"])
        await dep.start_router(health_interval=300)
        await dep.wait_routable(1)
        host, rport = dep.router_url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(rport))
        body = json.dumps(chat()).encode()
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"User-Agent: tool \xe2\x82\xac\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
        head = state["requests"][0][0]
        assert b"User-Agent: tool \xe2\x82\xac\r\n" in head
    finally:
        server.close()


# -- malformed backend answers -----------------------------------------------------------------------
MALFORMED = {
    "two-content-lengths": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\n"
                           b"Content-Length: 3\r\n\r\n{\"a\": \"bcd\"}",
    "hex-prefixed-chunk-size": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                               b"0x5\r\n{\"a\":\r\n0\r\n\r\n",
    "space-before-colon": b"HTTP/1.1 200 OK\r\nContent-Type : application/json\r\nContent-Length: 2\r\n\r\n{}",
    "negative-chunk-size": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"-5\r\n{\"a\":\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("answer", MALFORMED.values(), ids=MALFORMED.keys())
async def test_a_malformed_answer_fails_the_attempt_as_upstream_protocol(dep, answer):
    async def bad(writer: asyncio.StreamWriter, state: dict):
        writer.write(answer)
        await writer.drain()

    server, port, state = await raw_backend(bad)
    try:
        await dep.register("bad", port, ["m"])
        await dep.start_router(health_interval=300, retries=0)
        await dep.wait_routable(1)
        status, data, _ = await dep.post("/v1/chat/completions", chat())
        assert status == 502, (status, data)
        assert data["error"]["code"] == "upstream_protocol"
        s = await backend_stats(dep, "bad")
        assert s["errors"] == {"upstream_protocol": 1}, s
    finally:
        server.close()


async def test_a_malformed_answer_is_retried_on_another_backend(dep):
    async def bad(writer: asyncio.StreamWriter, state: dict):
        writer.write(MALFORMED["two-content-lengths"])
        await writer.drain()

    server, port, state = await raw_backend(bad)
    try:
        await dep.register("bad", port, ["m"])
        await dep.start_mock("good", ["m"])
        await dep.start_router(health_interval=300, retries=1)
        await dep.wait_routable(2)
        for _ in range(4):
            status, data, headers = await dep.post("/v1/chat/completions", chat())
            assert status == 200 and headers["X-InfiniLM-Backend"] == "good", (status, data)
        errors = (await backend_stats(dep, "bad"))["errors"]
        assert list(errors) == ["upstream_protocol"] and errors["upstream_protocol"] >= 1, errors
    finally:
        server.close()


async def test_a_malformed_chunk_mid_stream_ends_with_an_error_event(dep):
    async def bad_stream(writer: asyncio.StreamWriter, state: dict):
        first = b"data: {\"choices\": [{\"delta\": {\"content\": \"a\"}}]}\n\n"
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"%x\r\n%s\r\n" % (len(first), first))
        await writer.drain()
        writer.write(b"-5\r\nnope!\r\n0\r\n\r\n")
        await writer.drain()

    server, port, state = await raw_backend(bad_stream)
    try:
        await dep.register("bad", port, ["m"])
        await dep.start_router(health_interval=300)
        await dep.wait_routable(1)
        async with dep.session.post(dep.router_url + "/v1/chat/completions", json=chat(stream=True)) as r:
            assert r.status == 200
            text = (await r.read()).decode()
        events = [e for e in text.split("\n\n") if e.strip()]
        assert events[0].startswith("data: {\"choices\"")
        err = json.loads(events[-1].removeprefix("data: "))
        assert err["error"]["code"] == "upstream_stream_error" and "[DONE]" not in text
        assert (await backend_stats(dep, "bad"))["errors"] == {"upstream_protocol": 1}
    finally:
        server.close()


# -- exact counters ------------------------------------------------------------------------------------
async def test_streams_whose_clients_hang_up_right_after_done_are_not_errors(dep):
    """A client may close as soon as it has read `[DONE]`, before the backend's last chunk terminator
    arrives: the client has its whole answer, so it is no error."""
    n = 20
    all_closed = asyncio.Event()

    async def done_then_terminator(writer: asyncio.StreamWriter, state: dict):
        events = [b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n', b"data: [DONE]\n\n"]
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events))
        await writer.drain()
        await all_closed.wait()  # as an engine may: the stream's end follows [DONE] a moment later
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    server, port, state = await raw_backend(done_then_terminator)
    try:
        await dep.register("a", port, ["m"])
        await dep.start_router(health_interval=300)
        await dep.wait_routable(1)

        async def one(session: aiohttp.ClientSession) -> bool:
            r = await session.post(dep.router_url + "/v1/chat/completions", json=chat(stream=True))
            got_done = False
            async for line in r.content:
                if line.startswith(b"data: [DONE]"):
                    got_done = True
                    break
            r.close()  # hang up at once, as an SDK may
            return got_done

        async with aiohttp.ClientSession() as session:
            results = await asyncio.gather(*(one(session) for _ in range(n)))
        assert all(results)
        all_closed.set()

        async def settled():
            s = await backend_stats(dep, "a")
            return s if s["in_flight"] == 0 and s["request_count"] == n else None
        s = await async_wait_for(settled, timeout=10, what="every stream accounted")
        assert s["errors"] == {} and s["error_count"] == 0, s
        _, stats, _ = await dep.get("/stats")
        assert stats["models"]["m"]["error_count"] == 0
    finally:
        all_closed.set()
        server.close()


async def test_clients_that_go_away_mid_stream_are_each_counted_once(dep):
    await dep.start_mock("a", ["m"], chunks=500, chunk_interval=0.01)
    await dep.start_router(health_interval=300)
    await dep.wait_routable(1)
    k = 5

    async def leave(session: aiohttp.ClientSession) -> None:
        r = await session.post(dep.router_url + "/v1/chat/completions", json=chat(stream=True))
        await r.content.readline()
        r.close()

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(leave(session) for _ in range(k)))

    async def settled():
        s = await backend_stats(dep, "a")
        return s if s["in_flight"] == 0 and s["request_count"] == k else None
    s = await async_wait_for(settled, timeout=10, what="every stream accounted")
    assert s["errors"] == {"client_disconnect": k}, s


# -- models.retrieve -------------------------------------------------------------------------------------
async def test_openai_sdk_models_retrieve_answers_from_the_table(dep):
    openai = pytest.importorskip("openai")
    await dep.start_mock("a", ["alpha", "beta"])
    await dep.start_router()
    await dep.wait_routable(1)
    client = openai.AsyncOpenAI(base_url=dep.router_url + "/v1", api_key="unused", max_retries=0)
    try:
        m = await client.models.retrieve("beta")
        assert m.id == "beta" and m.object == "model"
        with pytest.raises(openai.NotFoundError) as exc:
            await client.models.retrieve("nope")
        assert exc.value.body["code"] == "model_not_found"
    finally:
        await client.close()


# -- idle upstream connections ---------------------------------------------------------------------------
async def test_idle_upstream_connections_are_capped_and_reaped(dep, procs):
    from test_router_proxy import established_to, start_mock_process
    port, _ = await start_mock_process(dep, procs, "a", ["m"], "--latency", "0.3")
    await dep.start_router(health_interval=300, upstream_max_idle=4, upstream_idle_timeout=1.0)
    await dep.wait_routable(1)
    before = established_to(port)  # the test's own pooled connection from the readiness probe
    async with aiohttp.ClientSession() as session:
        async def one() -> int:
            async with session.post(dep.router_url + "/v1/chat/completions", json=chat()) as r:
                await r.read()
                return r.status
        assert await asyncio.gather(*(one() for _ in range(30))) == [200] * 30
    assert established_to(port) <= before + 4, "idle connections beyond the cap must be closed"
    await async_wait_for(lambda: established_to(port) == before, timeout=10,
                         what="idle connections closed after upstream_idle_timeout")
