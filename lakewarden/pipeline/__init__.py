"""The reference pipeline: dvc.yaml's steps, composed from every layer's verbs.

"Pipeline" means this and only this in the project: the DVC pipeline of dvc.yaml, rendered from
params.yaml and the policies (:mod:`~lakewarden.pipeline.dvcyaml`), whose manifests live in the
repository's ``pipeline/`` folder. Its units are *steps* (sources, ingest, silver, features,
train, evaluate, register, deploy); DVC calls each a stage, so dvc.yaml and the command that
runs one (``lakewarden pipeline stage NAME``) keep DVC's word. A *stage* everywhere else is the
policy gate's: the kind of governed action a role may run (``governance.stages.Stage``). Each
step asks the gate for its own stage(s) before it touches data.

- :mod:`~lakewarden.pipeline.params`: params.yaml, validated (every mistake with its line);
- :mod:`~lakewarden.pipeline.steps`: the steps, :func:`run_step` and how each last ended;
- :mod:`~lakewarden.pipeline.manifests`: the small JSON files DVC versions (no rows);
- :mod:`~lakewarden.pipeline.smoke`: the deploy step's smoke requests;
- :mod:`~lakewarden.pipeline.provenance`: after ``dvc repro`` — trace, checkout, summary.

This is library code (a scheduler can call :func:`run_step` directly and skip nothing: each
step's verbs decide and audit); the command layer (:mod:`lakewarden.commands.pipeline`) only
parses and renders.
"""

from lakewarden.pipeline.manifests import table_manifest
from lakewarden.pipeline.params import OUT, PARAMS, REPORTS, Params, PipelineError, load_params, model_dataset
from lakewarden.pipeline.provenance import checkout, deploy_status, summary, trace
from lakewarden.pipeline.steps import STEPS, StepFailed, is_fairness_rule, run_step, step_outcome

__all__ = [
    "OUT", "PARAMS", "REPORTS", "STEPS", "Params", "PipelineError", "StepFailed", "checkout", "deploy_status",
    "is_fairness_rule", "load_params", "model_dataset", "run_step", "step_outcome", "summary", "table_manifest",
    "trace",
]
