"""The stages the policy gate decides on: a plain enum in a module that imports nothing.

It lives apart from :mod:`governance.policy` (pydantic models, loaded only when a command
opens its policies) so that the command line can name stages — ``gate check STAGE`` — without
paying for the policy model at start (``lakewarden --help`` stays fast). ``governance.policy``
re-exports it; both names are the same class.
"""

from __future__ import annotations

from enum import Enum


class Stage(str, Enum):
    """Pipeline stages and administrative actions the gate decides on."""

    INGEST = "ingest"
    QUERY = "query"
    FEATURES = "features"
    TRAIN = "train"
    EVALUATE = "evaluate"
    REGISTER = "register"
    APPROVE = "approve"
    DEPLOY = "deploy"
    SERVE = "serve"
    MAINTAIN = "maintain"
    REQUEST = "request"
    AUDIT = "audit"
    KEYS = "keys"
    LINEAGE = "lineage"
    POLICY = "policy"


__all__ = ["Stage"]
