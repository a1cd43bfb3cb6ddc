"""The serving layer: the KServe predictor, governed deployment, monitoring and drift alerts.

Depends on governance, features and the training registry. Built by issue #6 (serving).
"""
