"""Errors of erasure and access requests.

::

    LakewardenError                      (governance.errors)
    └── RequestError                     bad input, unknown request or subject (exit 2)
        └── MissingHandlers              a required erasure handler is not installed or fails to load

:class:`~governance.errors.AccessDenied` (exit 3) comes from the gate, before anything else.
"""

from __future__ import annotations

from collections.abc import Mapping

from governance.errors import LakewardenError

__all__ = ["MissingHandlers", "RequestError"]


class RequestError(LakewardenError):
    """A request cannot be filed or run as asked (unknown id or subject, bad option)."""

    exit_code = 2


class MissingHandlers(RequestError):
    """Required erasure handlers are missing: no request starts without every one of them.

    Attributes:
        missing: ``{handler name: why it is missing}``, in the order of
            :data:`~governance.erasure.handlers.REQUIRED_HANDLERS`.
    """

    def __init__(self, missing: Mapping[str, str]) -> None:
        self.missing = dict(missing)
        names = ", ".join(f"{n!r} ({why})" for n, why in self.missing.items())
        super().__init__(
            f"refusing to start: required erasure handler(s) missing: {names}",
            hint="install lakewarden with every layer (pip install -e .); the handlers are the "
                 "'lakewarden.erasure_handlers' entry points",
        )
