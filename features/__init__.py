"""The features layer: a Feast repository over the governed Delta tables, with purpose limitation.

Depends on governance and lakehouse. Built by issue #4 (feature store).
"""
