"""Load every layer's erasure/access handler (importing a layer's module registers it)."""

from __future__ import annotations


def load() -> None:
    """Import the layers' handler modules so they register with ``governance.requests``."""
    import features.erasure  # noqa: F401
    import lakehouse.erasure  # noqa: F401
    import serving.erasure  # noqa: F401
    import training.erasure  # noqa: F401
