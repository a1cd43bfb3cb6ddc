"""Lakewarden: a governance-first data lakehouse and MLOps suite.

The library lives in the layer packages (governance, lakehouse, features,
training, serving); this package holds only the command-line shell.
"""

__version__ = "0.1.0"
