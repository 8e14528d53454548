"""One request's stream of cumulative outputs between the output loop (which puts) and the request's consumer (which
gets), as vLLM v1's RequestOutputCollector: what is put while the consumer is busy replaces what it has not taken
yet, since each output already holds everything before it. A consumer that falls a step behind (the API process
with hundreds of streams) then gets one output for the steps it missed, not one per step to work through.

Cheaper than an asyncio.Queue per request: a put is an assignment and, when the consumer waits, one future's result;
a get that finds an output ready does not suspend.
"""

from __future__ import annotations

import asyncio

from .outputs import RequestOutput


class OutputStream:
    __slots__ = ("_item", "_error", "_waiter")

    def __init__(self):
        self._item: RequestOutput | None = None
        self._error: BaseException | None = None
        self._waiter: asyncio.Future | None = None

    def put(self, item: RequestOutput | BaseException) -> None:
        """A newer cumulative output replaces an untaken one; an error is raised after the output before it (a
        later output is dropped: the request has failed)."""
        if isinstance(item, BaseException):
            if self._error is None:
                self._error = item
        elif self._error is None:
            self._item = item
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    async def get(self) -> RequestOutput:
        """The latest output not taken yet (waiting for one), or raises the stream's error once outputs are taken."""
        while True:
            item = self._item
            if item is not None:
                self._item = None
                return item
            if self._error is not None:
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
