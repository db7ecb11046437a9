"""The root of epp's exceptions.

Every error epp raises on purpose derives from :class:`EPPError` and keeps the builtin base it
had before (``ValueError`` for bad configuration or input), so ``except EPPError`` catches the
picker's refusals while ``except ValueError`` code keeps working. Errors of the libraries
underneath are mapped at the edges: grpc and HTTP/2 failures become ext_proc statuses or
``h2edge`` connection errors, YAML errors ``ConfigError``, Kubernetes API errors discovery
warnings and metrics. A leaf module: the framework may import it.
"""

from __future__ import annotations

__all__ = ["EPPError"]


class EPPError(Exception):
    """Base class of every exception epp raises on purpose."""
