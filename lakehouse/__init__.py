"""The lakehouse layer: governed ingest, validation, protection, Delta tables and embedded SQL.

Depends on governance only. Built by issue #3 (governed lakehouse).
"""
