"""Who is asking: the request's public id, its priority class and the client's address.

The API layer makes a :class:`Ticket` for every inference request (``X-Request-Id``, kept when
the client sent one; ``X-Corral-Priority``; the API key's default ``priority``) and sets
:data:`CURRENT` for the handler's task, so
``Supervisor.acquire`` - called from several routes' helpers - knows it without every helper
passing it on. Outside a request (start-up preloads, tests) there is none.
"""

from __future__ import annotations

from contextvars import ContextVar

import msgspec

from corral.scheduler import Priority


class Ticket(msgspec.Struct, frozen=True):
    id: str  # the X-Request-Id the response carries
    priority: Priority | None = None  # X-Corral-Priority; None = the model's policy
    client: str = ""  # the client's address
    key_priority: Priority | None = None  # its API key's default, when the model's policy has none


CURRENT: ContextVar[Ticket | None] = ContextVar("corral_ticket", default=None)

__all__ = ["CURRENT", "Ticket"]
