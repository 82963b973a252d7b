"""Domain errors: what went wrong, in words a client can read, without HTTP.

The store, registry, supervisor and default-model import raise these; only the api layer knows
statuses (``daemon/api/errors.py`` maps each class to one, and the error middleware answers with
it). ``message`` is the client-facing text, Ollama's exact wording where Ollama has one.
"""

from __future__ import annotations


class CorralError(Exception):
    """Base of the domain errors; never raised itself."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class InvalidRequest(CorralError):
    """The request (a name, digest, option, Modelfile, file) is wrong: the client must change it."""


class TooLarge(CorralError):
    """The request is larger than a limit allows (a runner's own body limit)."""


class NotFound(CorralError):
    """The named model, blob or registry object does not exist."""


class Busy(CorralError):
    """Not now: the queue is full or the daemon is shutting down; the same request may work later
    (``retry_after``: seconds until the queue has drained at its recent rate, when known)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Cancelled(CorralError):
    """The request was ended on purpose (``DELETE /api/requests/{id}``)."""


class RegistryUnreachable(CorralError):
    """The registry could not be reached (connection or TLS failure) while fetching a manifest."""


class NoSpace(CorralError):
    """A write failed for a full disk or quota."""


class Failed(CorralError):
    """Our side failed: a load, a transfer, a corrupt manifest or blob, an internal error."""


def model_not_found(name: str) -> NotFound:
    return NotFound(f'model "{name}" not found, try pulling it first')
