"""The governance kernel: every stage of Lakewarden calls into it; it imports no other layer.

Modules:
    config      lakewarden.yaml, validated (ProjectConfig, load_config)
    policy      policies/*.yaml, validated as a set (PolicySet, load_policies, Stage)
    gate        the fail-closed policy gate (Gate, Actor, Resource, Decision)
    audit       the tamper-evident audit log (AuditLog, VerifyReport)
    keys        envelope encryption, per-subject keys, shredding (KeyRing, KeyStore, load_kek)
    lineage     OpenLineage run events and graphs (LineageStore, DatasetRef)
    workspace   one object that opens all of the above (Workspace)
    errors      the exception tree (LakewardenError and subclasses)
"""
