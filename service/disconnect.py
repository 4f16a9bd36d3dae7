"""Cancel a plain (non-streaming) route's work when its client disconnects.

Starlette cancels nothing when the client of a plain route goes away: the handler runs
to its end and its answer is dropped. The ASGI server reports the disconnect as an
`http.disconnect` message from `receive()` once the request body has been read (ASGI
HTTP spec; uvicorn's h11 and httptools protocols both do). `until_disconnected` waits
for that message beside the work and cancels the work when it comes: the pattern of
Starlette's `StreamingResponse` (`listen_for_disconnect`) and of vLLM's own OpenAI
server (`with_cancellation` in `vllm/entrypoints/serve/utils/api_utils.py`: two tasks,
`asyncio.wait(FIRST_COMPLETED)`), which the gateway cannot import (remote-mode
gateways do not load vLLM) and which returns before the cancelled work has cleaned up.

The work runs in its own asyncio task and is cancelled once (`Task.cancel`), like an
`asyncio.timeout` expiry: cleanup code that awaits on cancellation (vLLM's
`AsyncLLM.generate` awaits its abort message to the engine core; httpx closes the
upstream connection) runs to its end, which a level-triggered cancel scope (anyio)
would interrupt at each await.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

from starlette.types import Receive

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: The status a request whose client went away is counted with (nginx's convention:
#: "499 Client Closed Request"); nobody receives it.
CLIENT_CLOSED_REQUEST = 499


async def wait_for_disconnect(receive: Receive) -> None:
    """Return once `receive()` gives `http.disconnect` (any other message is skipped).
    Call it only after the request body was read: it consumes the messages."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(receive: Receive, work: Coroutine[Any, Any, T]) -> T | None:
    """Run `work` until it ends or the client disconnects, whichever comes first.

    Args:
        receive: the request's ASGI receive channel (`Request.receive`), its body read.
        work: the coroutine to run; it is run in a new task (contextvars copied).

    Returns:
        `work`'s result, or None when the client disconnected first: `work` was then
        cancelled, and this returns once its cleanup has finished.

    Raises:
        whatever `work` raised. If the calling task is cancelled, `work` is cancelled
        too and the cancellation propagates after its cleanup.
    """
    working = asyncio.ensure_future(work)
    watching = asyncio.ensure_future(wait_for_disconnect(receive))
    try:
        await asyncio.wait((working, watching), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        if not working.done():
            working.cancel()
        # Both end promptly (a cancelled receive, `work`'s cleanup); never left pending.
        await asyncio.wait((working, watching))
    if not watching.cancelled() and watching.exception() is not None:
        # A receive channel that fails is a broken connection: treated as a disconnect.
        logger.warning("receive failed while waiting for a disconnect: %r", watching.exception())
    if working.cancelled():
        return None
    return working.result()
