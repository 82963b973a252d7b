"""The one version corral reports: ``GET /api/version``, ``corral --version`` and the serve log.

It is the version of the Ollama API corral serves, not the Python package's version
(``pyproject.toml``): clients decide what to send by it (the ollama CLI and libraries gate
features such as thinking, tools and ``/api/show`` fields on the server version), so it names the
Ollama release whose behaviour ``shared/reference`` describes. Raise it only together with that
behaviour.
"""

from __future__ import annotations

VERSION = "0.13.0"
