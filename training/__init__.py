"""The training layer: Opacus DP-SGD, the privacy ledger, fairness evaluation, the model registry.

Depends on governance and features. Built by issue #5 (private training).
"""
