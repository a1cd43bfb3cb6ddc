"""What the compliance report shows of each registered model.

The report lives in the kernel (:mod:`governance.report`), which never imports a layer;
this module is the training layer's side of it: a :data:`governance.report.ModelSource`
that turns every model card into a :class:`governance.report.ModelSummary` — ε, δ, what
the model's build cost of the budget (unknown on older cards), utility, each fairness metric against the card's thresholds (the policy's), approvals and
deployments. Cards are read through the registry, so a card edited on disk fails here
(``ArtifactTampered``) instead of reaching the report.
"""

from __future__ import annotations

from governance.report import ModelSummary, Signoff, fairness_checks
from governance.workspace import Workspace
from training.registry import ModelCard, Registry

__all__ = ["model_summaries", "summarize"]


def summarize(card: ModelCard) -> ModelSummary:
    """One card as the report shows it."""
    f = card.fairness
    return ModelSummary(
        name=card.name,
        version=card.version,
        dataset=card.dataset,
        purpose=card.purpose,
        epsilon=card.privacy.epsilon,
        delta=card.privacy.delta,
        utility=dict(card.utility),
        fairness=() if f is None else fairness_checks(f.attributes, f.thresholds),
        fairness_passed=None if f is None else f.passed,
        status=card.status,
        approvals=tuple(
            Signoff(a.actor, a.role + (", overriding the fairness verdict" if a.override_reason else ""), a.at)
            for a in card.approvals
        ),
        deployments=tuple(Signoff(d.actor, d.target, d.at) for d in card.deployments),
        epsilon_spent=None if card.privacy.cost is None else card.privacy.cost.epsilon,
        delta_spent=None if card.privacy.cost is None else card.privacy.cost.delta,
        runs=None if card.privacy.cost is None else len(card.privacy.cost.runs),
    )


def model_summaries(ws: Workspace) -> list[ModelSummary]:
    """Every registered version's summary (a :data:`governance.report.ModelSource`)."""
    return [summarize(c) for c in Registry(ws).list()]
