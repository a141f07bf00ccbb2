"""Checks made before a request reaches the app, so that nothing is parsed or held that the
service would refuse: the Host header (against DNS rebinding), the size of the headers, the size
of the body (declared and as it arrives) and the time the body may take."""

from __future__ import annotations

import anyio
from fastapi import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.config import Settings


def host_name(value: str) -> str:
    """The name in a Host header, without its port ([::1]:8000 -> ::1)."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Guard:
    """Pure ASGI middleware: answers 400, 413, 431 or 408 with the service's JSON error."""

    def __init__(self, app: ASGIApp, settings: Settings):
        self.app = app
        hosts = {h.lower().strip("[]") for h in settings.allowed_hosts}
        self.hosts = None if "*" in hosts else hosts
        self.max_headers = settings.max_header_bytes
        self.max_body = settings.body_limit
        self.timeout = settings.body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self.check(scope)
        if refusal:
            status, detail = refusal
            await JSONResponse({"detail": detail}, status)(scope, receive, send)
            return
        await self.app(scope, self.limited(receive), send)

    def check(self, scope: Scope) -> tuple[int, str] | None:
        headers = scope["headers"]
        size = sum(len(k) + len(v) for k, v in headers)
        if size > self.max_headers:
            return 431, (
                f"request headers are {size} bytes, over the limit of {self.max_headers} "
                "(FACEOPT_MAX_HEADER_BYTES)"
            )
        values = dict(headers)
        host = host_name(values.get(b"host", b"").decode("latin-1"))
        if self.hosts is not None and host not in self.hosts:
            return 400, (
                f"Host {host!r} is not served here (allowed: {', '.join(sorted(self.hosts))}); "
                "set FACEOPT_ALLOWED_HOSTS to the names clients use to reach this service"
            )
        length = values.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body:
            return 413, self._too_large(int(length))
        return None

    def _too_large(self, size: int) -> str:
        return (
            f"request body of {size} bytes or more, over the limit of {self.max_body} "
            "(FACEOPT_MAX_BODY_BYTES; by default FACEOPT_MAX_FILES files of FACEOPT_MAX_FILE_BYTES)"
        )

    def limited(self, receive: Receive) -> Receive:
        """`receive` that counts body bytes and gives the whole body `timeout` seconds from its
        first read; an HTTPException from here is answered by the app like any other."""
        deadline: float | None = None
        received = 0
        done = False

        async def limited_receive() -> Message:
            nonlocal deadline, received, done
            if done:  # the body is in: later reads only wait for a disconnect
                return await receive()
            if deadline is None:
                deadline = anyio.current_time() + self.timeout
            try:
                with anyio.fail_after(max(0.0, deadline - anyio.current_time())):
                    message = await receive()
            except TimeoutError:
                raise HTTPException(
                    408,
                    f"request body not received within {self.timeout:g} s (FACEOPT_BODY_TIMEOUT)",
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise HTTPException(413, self._too_large(received))
                done = not message.get("more_body", False)
            return message

        return limited_receive
