"""After ``dvc repro``: dvc.lock tied to lineage runs (trace), pinned tables read back (checkout), the summary."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from governance.gate import Actor, Resource
from governance.policy import Stage
from governance.workspace import Workspace
from lakewarden.pipeline.manifests import read_json
from lakewarden.pipeline.params import OUT, PARAMS, REPORTS, PipelineError, load_params, model_dataset
from lakewarden.pipeline.steps import is_fairness_rule, step_outcome


def _md5(path: Path) -> str:
    h = hashlib.md5()  # noqa: S324 - DVC's own content hash, not security
    h.update(path.read_bytes())
    return h.hexdigest()


def trace(ws: Workspace, lock: Path = Path("dvc.lock")) -> list[dict[str, Any]]:
    """Each DVC stage: its dvc.lock hash of the manifest, whether the file still matches it, the
    lineage run the manifest names (job, git commit) and the Delta / model versions it pinned."""
    import yaml

    if not lock.exists():
        raise PipelineError(f"{lock} not found: run dvc repro first")
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    runs = {e["run_id"]: e for e in ws.lineage.events()}
    rows = []
    for name, st in stages.items():
        for out in st.get("outs", []):
            path = Path(out["path"])
            if path.is_dir() and (path / "stage.json").exists():
                path = path / "stage.json"
                out = {**out, "md5": None}
            elif path.suffix != ".json" or not str(path).startswith(str(OUT)):
                continue
            man = json.loads(path.read_text()) if path.exists() else {}
            run = runs.get(man.get("lineage_run_id"), {})
            pinned = {k: v["version"] for k, v in (man.get("tables") or {}).items()}
            pinned.update({f"{k}": v for k, v in (man.get("data_versions") or {}).items()})
            if "version" in man and "model" in man:
                pinned[f"model:{man['model']}"] = man["version"]
            rows.append({"stage": name, "manifest": str(path), "lock_md5": out.get("md5"),
                         "matches": path.exists() and (out["md5"] is None or _md5(path) == out["md5"]),
                         "run_id": man.get("lineage_run_id"), "job": run.get("job_name"),
                         "git_commit": (man.get("git") or {}).get("commit"), "pinned": pinned})
    return rows


def checkout(ws: Workspace, actor: Actor, out_dir: Path, *, manifest: Path = OUT / "silver.json",
             fmt: Literal["parquet", "csv"] = "parquet") -> dict[str, Any]:
    """Read each table pinned by a manifest back at its Delta version, minus erased subjects.

    A restore copies rows unmasked, so the gate decides it as maintenance of each table (data
    engineers and compliance, with access to the layer): an analyst, whose queries are masked
    and filtered, is refused. Rows of subjects whose key was shredded are dropped; their
    encrypted values could not be opened anyway.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq
    from deltalake import DeltaTable

    from lakehouse.catalog import Catalog, TableRef

    ws.gate.require_stage(Stage.MAINTAIN, actor, Resource.system("tables"))  # before the manifest says anything
    man = read_json(manifest, stage=manifest.stem)
    tables = man.get("tables") or {}
    if not tables:
        raise PipelineError(f"{manifest} pins no tables")
    out_dir.mkdir(parents=True, exist_ok=True)
    cat = Catalog(ws.config)
    done: dict[str, Any] = {}
    for name, m in tables.items():
        layer, ds = name.split(".", 1)
        ws.gate.enforce(Stage.MAINTAIN, actor, Resource.table(ds, layer))
        uri = cat.uri(TableRef(layer, ds))  # type: ignore[arg-type]
        try:
            t = DeltaTable(uri, version=m["version"], storage_options=cat.storage_options).to_pyarrow_table()
        except Exception as exc:  # noqa: BLE001 - deltalake raises several kinds for a vacuumed version
            raise PipelineError(f"{name}@{m['version']} can no longer be read ({str(exc).splitlines()[0]}): "
                                "history older than the policy's retention.history is vacuumed") from None
        key = ws.policies.dataset(ds).subject_key
        tokens = t[key].to_pylist()
        store = ws.keyring.store
        shredded = [tok for tok in set(tokens) if tok is not None and store.subject_state(tok) == "shredded"]
        keep = pc.invert(pc.is_in(t[key], value_set=pa.array(shredded, type=t.schema.field(key).type)))
        kept = t.filter(keep)
        dest = out_dir / f"{name}@{m['version']}.{fmt}"
        (pq.write_table(kept, dest) if fmt == "parquet" else pacsv.write_csv(kept, dest))
        done[name] = {"version": m["version"], "rows": kept.num_rows, "erased_rows_dropped": t.num_rows - kept.num_rows,
                      "file": str(dest)}
    ws.audit.record("pipeline.checkout", actor=actor.name, outcome="ok", resource=f"manifest:{manifest}",
                    details={k: {"version": v["version"], "rows": v["rows"]} for k, v in done.items()})
    return done


def summary(ws: Workspace, actor: Actor) -> dict[str, Any]:
    """What the last ``dvc repro`` produced: rows, quarantined, ε, utility, fairness, the deployed
    model, and the audit chain verified (by ``actor``, who needs the audit permission)."""
    from governance.audit_ops import verify_audit
    from governance.ledger import PrivacyLedger

    def opt(path: Path) -> Any:
        return json.loads(path.read_text()) if path.exists() else None

    ingest, train, fair = opt(REPORTS / "ingest.json") or {}, opt(REPORTS / "train.json"), opt(REPORTS / "fairness.json")
    deployed, registered = opt(OUT / "deploy.json"), opt(OUT / "register.json")
    audit = verify_audit(ws, actor)
    from dataclasses import asdict

    dataset = (registered or {}).get("dataset") or (opt(OUT / "features.json") or {}).get("dataset")
    if dataset is None and PARAMS.exists():  # before the features stage ran: the dataset the params train on
        try:
            dataset = model_dataset(ws.policies, load_params(PARAMS).train.features)
        except ValueError:
            dataset = None
    budget = asdict(PrivacyLedger(ws).status(dataset)) if dataset else None
    return {
        "rows": {ds: v.get("rows_accepted") for ds, v in ingest.items()},
        "quarantined": {ds: v.get("rows_quarantined") for ds, v in ingest.items()},
        "epsilon_run": train and train["epsilon"], "budget": budget, "budget_dataset": dataset,
        "utility": train and {k: train[k] for k in ("auc", "accuracy") if k in train},
        "fairness": fair,
        "registered": registered and registered["ref"],
        "deployed": deployed and deployed["ref"],
        "deploy_status": deploy_status(deployed and deployed["ref"], step_outcome(ws, "deploy")),
        "audit_ok": audit.ok, "audit_events": audit.events,
    }


def deploy_status(deployed_ref: str | None, outcome: dict[str, Any] | None) -> str:
    """One line: what was deployed, or why not (the gate's rule, a failed fairness verdict, a failure)."""
    if deployed_ref:
        return deployed_ref
    if not outcome:
        return "not deployed (the deploy stage has not run)"
    if outcome["status"] == "ok":
        return "not deployed (pipeline/deploy.json is missing)"
    rules = outcome.get("rule_ids") or []
    if outcome["status"] == "denied":
        fair = [r for r in rules if is_fairness_rule(r)]
        if fair:
            return f"not deployed: fairness failed (rule {', '.join(fair)})"
        return f"not deployed: refused by the gate (rule {', '.join(rules) or 'default-deny'})"
    return f"not deployed: the deploy stage {outcome['status']}: {outcome.get('message', '')}"


