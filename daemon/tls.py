"""HTTPS for ``corral serve``: the server's SSL context from ``CORRAL_TLS_CERT`` (PEM certificate
chain) and ``CORRAL_TLS_KEY`` (PEM private key), and its reload on SIGHUP.

A reload loads the new pair into the same context, so the listener keeps its socket and every
connection accepted afterwards presents the new certificate; connections already open keep the
one they were made with. A pair that does not load (missing file, key not matching the
certificate) changes nothing: the error says why and the old certificate stays.
"""

from __future__ import annotations

import ssl
from pathlib import Path


class TLSError(ValueError):
    """The certificate or key cannot be used; the message names the files."""


def _load(ctx: ssl.SSLContext, cert: Path, key: Path) -> None:
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise TLSError(
            f"cannot use CORRAL_TLS_CERT={cert} with CORRAL_TLS_KEY={key}: {e}"
        ) from None


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context (TLS 1.2 or newer) presenting ``cert``. Raises :class:`TLSError`."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load(ctx, cert, key)
    return ctx


def reload(ctx: ssl.SSLContext, cert: Path, key: Path) -> None:
    """Load ``cert``/``key`` into the live ``ctx``, after checking them in a throwaway
    context: a pair that fails leaves ``ctx`` as it was. Raises :class:`TLSError`. Blocks on
    two small file reads (call it on the loop thread: a context is not changed concurrently)."""
    server_context(cert, key)
    _load(ctx, cert, key)
