"""uvicorn glue: the listening socket, bound before the model loads, and an HTTP protocol with a header timeout.

uvicorn's h11 protocol has a keep-alive timeout between requests but none for the request head: a client that
opens a connection and sends nothing, or sends its headers one byte a second, holds the connection (and a
file descriptor) for ever. `HeaderTimeoutH11Protocol` closes a connection whose next request head has not
arrived within `timeout_s` of the connection opening or of the previous response ending.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port), not yet listening: the port is ours before the model loads (which
    takes minutes), and uvicorn listens on it once the app is ready. OSError if the address is in use."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart over TIME_WAIT
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def header_timeout_protocol(timeout_s: float) -> type[H11Protocol]:
    """An H11Protocol class (for `uvicorn.Config(http=...)`) closing connections slow to send a request head."""

    class HeaderTimeoutH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None
        _waiting_since_cycle = None

        def _arm(self) -> None:
            self._disarm()
            self._waiting_since_cycle = self.cycle
            self._head_timer = self.loop.call_later(timeout_s, self._head_timeout)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            # A new cycle means a request head arrived since the timer was armed: nothing to do.
            if self.cycle is self._waiting_since_cycle and not self.transport.is_closing():
                self.logger.debug("closing a connection that sent no request head within %.1f s", timeout_s)
                self.transport.close()

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            super().handle_events()
            if self._head_timer is not None and self.cycle is not self._waiting_since_cycle:
                self._disarm()  # the head is in

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self._arm()  # waiting for the next request head on this keep-alive connection

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderTimeoutH11Protocol


class PreboundServer(uvicorn.Server):
    """uvicorn.Server serving sockets bound beforehand (`run(sockets=[...])`). uvicorn prints its
    "Uvicorn running on ..." line only for sockets it bound itself; this prints it for ours."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if sockets and self.started:
            host, port = sockets[0].getsockname()[:2]
            fmt = "%s://[%s]:%d" if ":" in host else "%s://%s:%d"
            logging.getLogger("uvicorn.error").info(f"Uvicorn running on {fmt} (Press CTRL+C to quit)",
                                                    "https" if self.config.ssl else "http", host, port)
