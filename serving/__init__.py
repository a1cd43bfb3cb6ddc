"""The serving layer: the KServe predictor, governed deployment, monitoring and drift alerts.

Depends on governance, features and the training registry (models are loaded only through
``training.registry.Registry.load``; tests/test_layering.py holds it). Built by issue #6 (serving).
"""
