"""A small asyncio HTTP/1.1 client for JSON requests and Server-Sent Events (no dependencies).

Enough for OpenAI-compatible servers (vLLM, SGLang, ...): ``http`` and ``https``, responses framed by
``Content-Length``, ``chunked`` or the connection's end, and idle keep-alive connections reused (a
reused connection the server already closed is retried once on a new one). Events are yielded as
soon as the bytes that complete them arrive, so the caller can time them.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncIterator
from urllib.parse import urlsplit


class HttpStatusError(Exception):
    """A response other than 2xx: ``status`` and the start of the body."""

    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status


class HttpClient:
    def __init__(self, base_url: str, headers: dict[str, str] | None = None, max_idle: int = 256):
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.host = url.hostname
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.prefix = url.path.rstrip("/")
        self._ssl = ssl.create_default_context() if url.scheme == "https" else None
        self._headers = {"Host": url.netloc, "User-Agent": "epserve-load-tests", **(headers or {})}
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._max_idle = max_idle

    async def get_json(self, path: str) -> object:
        chunks = [c async for c in self._request("GET", path, None)]
        return json.loads(b"".join(chunks))

    async def post_sse(self, path: str, payload: dict) -> AsyncIterator[str]:
        """POSTs ``payload`` as JSON and yields the ``data`` of each event of the streamed reply."""
        buffer, data = b"", []
        async with contextlib.aclosing(self._request("POST", path, json.dumps(payload).encode())) as chunks:
            async for chunk in chunks:
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    line = line.rstrip(b"\r")
                    if not line and data:
                        yield "\n".join(data)
                        data = []
                    elif line.startswith(b"data:"):
                        data.append(line[5:].removeprefix(b" ").decode())
        if data:
            yield "\n".join(data)

    async def close(self) -> None:
        while self._idle:
            self._idle.pop()[1].close()

    async def _request(self, method: str, path: str, body: bytes | None) -> AsyncIterator[bytes]:
        """Sends one request and yields the body's bytes as they arrive; raises HttpStatusError."""
        head = [f"{method} {self.prefix}{path} HTTP/1.1", *(f"{k}: {v}" for k, v in self._headers.items())]
        if body is not None:
            head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        message = ("\r\n".join(head) + "\r\n\r\n").encode() + (body or b"")
        reader, writer, status, headers = await self._exchange(message)
        reusable = False
        try:
            if not 200 <= status < 300:
                body = b"".join([c async for c in _body(reader, headers)])
                raise HttpStatusError(status, body.decode("utf-8", "replace"))
            async for chunk in _body(reader, headers):
                yield chunk
            reusable = headers.get("connection", "").lower() != "close" and (
                "content-length" in headers or headers.get("transfer-encoding", "").lower() == "chunked")
        finally:
            if reusable and len(self._idle) < self._max_idle:
                self._idle.append((reader, writer))
            else:
                writer.close()

    async def _exchange(self, message: bytes):
        """Writes ``message`` on an idle connection (or a new one) and reads the status line and headers."""
        while True:
            reused = bool(self._idle)
            reader, writer = self._idle.pop() if reused else await asyncio.open_connection(
                self.host, self.port, ssl=self._ssl)
            try:
                writer.write(message)
                await writer.drain()
                status_line = await reader.readline()
                if not status_line:
                    raise ConnectionResetError("connection closed before the response")
                headers = {}
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                return reader, writer, int(status_line.split()[1]), headers
            except (ConnectionError, asyncio.IncompleteReadError):
                writer.close()
                if not reused:
                    raise


async def _body(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while size := int((await reader.readline()).split(b";")[0], 16):
            yield await reader.readexactly(size)
            await reader.readexactly(2)                 # the CRLF after each chunk
        while (await reader.readline()) not in (b"\r\n", b"\n", b""):
            pass                                        # trailers
    elif "content-length" in headers:
        remaining = int(headers["content-length"])
        while remaining > 0:
            chunk = await reader.read(min(remaining, 65536))
            if not chunk:
                raise asyncio.IncompleteReadError(b"", remaining)
            remaining -= len(chunk)
            yield chunk
    else:
        while chunk := await reader.read(65536):
            yield chunk
