"""The feature store: Feast over the governed silver tables, with purpose limitation.

Feature views are declared in policy (``features:`` of a dataset policy) and generated
here as Feast objects: one entity per dataset whose join key is the subject key — a
pseudonymous token, never a raw identifier — and one feature view per declaration, reading
``silver.<dataset>`` through :class:`features.offline.LakewardenOfflineStore` (Delta via
deltalake, point-in-time joins by Feast). Online: SQLite (embedded) or Redis, chosen in
``lakewarden.yaml`` (``features.online``). Feast reaches Redis only as :mod:`features.online`
says (TLS required with auth on, the password from the environment, in memory only), and after
the database was checked to be this workspace's; a Redis failure is :class:`features.online.OnlineStoreError`.

Every request states a purpose and goes through the gate first: features derived from
sensitive attributes are served only for purposes the policy allows; a denial names the
rule and is audited. Training sets record their lineage (source tables and Delta
versions). A subject leaves the feature store only through an erasure request
(:mod:`governance.erasure`), whose ``features`` handler (:mod:`features.erasure`) deletes the
online rows.

Example::

    fs = Features(ws)
    fs.apply(actor)
    fs.materialize(actor)
    ts = fs.training_set(actor, dataset="customers", purpose="credit_scoring",
                         features=["customer_profile:income", "customer_profile:region"], label="defaulted")
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from governance.errors import LakewardenError
from governance.gate import Actor, Resource
from governance.keys import TOKEN_RE
from governance.lineage import DatasetRef
from governance.policy import DatasetPolicy, Stage
from governance.workspace import Workspace
from lakehouse.catalog import Catalog, TableRef
from lakehouse.trino import FEATURES_USER
from lakehouse.validate import output_type

# The Trino offline store reads silver through Trino as lakehouse.trino.FEATURES_USER (the gate
# has already decided the purpose) and uploads entity rows into Trino's memory catalog.
TRINO_SCRATCH_CATALOG = "memory"
TRINO_SCRATCH_SCHEMA = "feast"

_FEAST_TYPES = {
    pa.string(): "String",
    pa.float64(): "Float64",
    pa.float32(): "Float32",
    pa.int64(): "Int64",
    pa.int32(): "Int32",
    pa.bool_(): "Bool",
    pa.binary(): "Bytes",
}


ENGINES = ("local", "ray")


class FeatureError(LakewardenError):
    """A feature request is malformed (unknown view or feature, bad entity rows)."""

    exit_code = 2


@dataclass
class TrainingSet:
    table: pa.Table
    dataset: str
    features: list[str]
    purpose: str
    sources: dict[str, int] = field(default_factory=dict)  # table -> Delta version
    run_id: str = ""
    decision: Any = None  # the gate's Decision that allowed it


class Features:
    """Feast for one workspace; objects and configuration come from policy and lakewarden.yaml."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self.cfg = ws.config.features
        self.catalog = Catalog(ws.config)
        # Per feature list: its dataset and columns, and the online result's schema (the
        # policies do not change under an open workspace; a lookup repeats the same list).
        self._resolved: dict[tuple[str, ...], tuple[DatasetPolicy, tuple[str, ...]]] = {}
        self._online_schemas: dict[tuple[str, ...], pa.Schema] = {}

    # -- Feast configuration and objects ----------------------------------------------------
    def repo_config(self) -> Any:
        from feast import RepoConfig
        from feast.infra.online_stores.redis import RedisOnlineStoreConfig
        from feast.infra.online_stores.sqlite import SqliteOnlineStoreConfig

        home = self.ws.config.workspace_dir / "feast"
        home.mkdir(parents=True, exist_ok=True)
        offline: dict[str, Any] = {"type": "features.offline.LakewardenOfflineStore"}
        if self.cfg.offline == "trino":
            if self.ws.config.auth.enabled:  # Feast's Trino store sends a fixed user name and no token
                raise FeatureError(
                    "auth is on, and Feast's Trino offline store connects as a fixed user without a token: refused",
                    hint="set features.offline: delta (the same point-in-time reads, in process, through the gate)")
            tc = self.ws.config.trino
            offline = {
                "type": "trino", "host": tc.host, "port": tc.port, "catalog": TRINO_SCRATCH_CATALOG,
                "dataset": TRINO_SCRATCH_SCHEMA, "user": FEATURES_USER, "connector": {"type": "memory"},
                "http-scheme": tc.http_scheme,
            }
        online = self.cfg.online
        if online.type == "redis":
            from features.online import feast_connection_string

            # Checked (plaintext refused with auth on) and with the password: in memory only, never a file.
            online_cfg: Any = RedisOnlineStoreConfig(connection_string=feast_connection_string(self.ws))
        else:
            online_cfg = SqliteOnlineStoreConfig(path=str(self.ws.config.path(online.path)))
        return RepoConfig(
            project=self.cfg.project,
            registry=str(self.ws.config.path(self.cfg.registry)),
            provider="local",
            offline_store=offline,
            online_store=online_cfg,
            entity_key_serialization_version=3,
            repo_path=str(home),
        )

    @cached_property
    def store(self) -> Any:
        from feast import FeatureStore

        if self.cfg.online.type == "redis":  # only this workspace's Redis database, reached as features/online.py says
            from features.online import redis_client

            redis_client(self.ws).close()
        self.ws.config.path(self.cfg.registry).parent.mkdir(parents=True, exist_ok=True)
        return FeatureStore(config=self.repo_config())

    def _reraise_online(self, exc: Exception) -> None:
        """Raise a Redis failure of Feast's as :class:`features.online.OnlineStoreError` (one line, the
        password redacted); return for anything else, which the caller re-raises as it is."""
        if self.cfg.online.type == "redis":
            from features.online import online_error

            err = online_error(self.ws, exc)
            if err is not None:
                raise err from None

    def objects(self) -> list[Any]:
        """Entities and feature views generated from the policies."""
        from feast import Entity, FeatureView, Field, FileSource
        from feast import types as ft
        from feast.data_format import DeltaFormat
        from feast.value_type import ValueType

        out: list[Any] = []
        for name, pol in sorted(self.ws.policies.datasets.items()):
            if not pol.features:
                continue
            entity = Entity(name=self.entity_name(pol), join_keys=[pol.subject_key], value_type=ValueType.STRING,
                            description=f"pseudonymous subject of {name} (a token, never an identifier)")
            out.append(entity)
            ref = TableRef("silver", name)
            for view, spec in sorted(pol.features.items()):
                if self.cfg.offline == "trino":
                    from feast.infra.offline_stores.contrib.trino_offline_store.trino_source import TrinoSource

                    src: Any = TrinoSource(name=f"silver_{name}_{view}", table=f"delta_lake.silver.{name}",
                                           timestamp_field=spec.timestamp)
                else:
                    src = FileSource(name=f"silver_{name}_{view}", path=self.catalog.uri(ref), file_format=DeltaFormat(),
                                     timestamp_field=spec.timestamp)
                fields = [Field(name=c, dtype=getattr(ft, _FEAST_TYPES[self._arrow_type(pol, c)])) for c in spec.columns]
                out.append(FeatureView(name=view, entities=[entity], ttl=spec.ttl, schema=fields, source=src,
                                       online=True, description=spec.description,
                                       tags={"lakewarden.dataset": name, "lakewarden.layer": "silver"}))
        return out

    @staticmethod
    def entity_name(pol: DatasetPolicy) -> str:
        return f"{pol.dataset}_subject"

    @staticmethod
    def _arrow_type(pol: DatasetPolicy, column: str) -> pa.DataType:
        col = pol.columns.get(column)
        return output_type(col) if col is not None else pa.float64()  # derived columns are numeric

    def _view(self, name: str) -> tuple[DatasetPolicy, str, Any]:
        for pol in self.ws.policies.datasets.values():
            if name in pol.features:
                return pol, name, pol.features[name]
        known = sorted(v for p in self.ws.policies.datasets.values() for v in p.features)
        raise FeatureError(f"unknown feature view '{name}' (declared: {', '.join(known) or 'none'})")

    def resolve(self, refs: list[str]) -> tuple[DatasetPolicy, list[str]]:
        """Check ``view:feature`` references; return the dataset's policy and the source columns they read.

        Reads policy only (no data, not gated): which dataset a model's features come from.
        """
        key = tuple(refs)
        hit = self._resolved.get(key)
        if hit is None:
            pol, columns = self._resolve_uncached(refs)
            hit = self._resolved[key] = (pol, tuple(columns))
        return hit[0], list(hit[1])

    def _resolve_uncached(self, refs: list[str]) -> tuple[DatasetPolicy, list[str]]:
        if not refs:
            raise FeatureError("name at least one feature as view:feature")
        policies, columns = set(), []
        for r in refs:
            view, sep, feat = r.partition(":")
            if not sep or not feat:
                raise FeatureError(f"feature reference {r!r} must look like view:feature")
            pol, _, spec = self._view(view)
            if feat not in spec.columns:
                raise FeatureError(f"feature view '{view}' has no feature '{feat}' (it has {', '.join(spec.columns)})")
            policies.add(pol.dataset)
            columns.append(feat)
        if len(policies) > 1:
            raise FeatureError(f"one request reads one dataset's features (got {', '.join(sorted(policies))})")
        return self.ws.policies.dataset(policies.pop()), columns

    # -- operations -------------------------------------------------------------------------
    def _trino_scratch(self) -> None:
        """Feast's Trino store uploads entity rows: a schema in the memory catalog holds them."""
        if self.cfg.offline != "trino":
            return
        from lakehouse.trino import check_server, connect

        check_server(self.ws)  # only this workspace's Trino (another's has other tables and rules)
        conn = connect(self.ws.config.trino, FEATURES_USER)
        try:
            cur = conn.cursor()
            cur.execute(f"CREATE SCHEMA IF NOT EXISTS {TRINO_SCRATCH_CATALOG}.{TRINO_SCRATCH_SCHEMA}")
            cur.fetchall()
        finally:
            conn.close()

    def apply(self, actor: Actor) -> list[str]:
        """Register the generated entities and feature views with Feast."""
        self.ws.gate.enforce(Stage.MAINTAIN, actor, Resource.system("features"))
        self._trino_scratch()
        objs = self.objects()
        try:
            self.store.apply(objs)
        except Exception as exc:
            self._reraise_online(exc)
            raise
        names = [o.name for o in objs]
        self.ws.audit.record("features.apply", actor=actor.name, outcome="ok", resource="system:features",
                             details={"objects": names})
        return names

    def materialize(self, actor: Actor, *, end: datetime | None = None) -> dict[str, int]:
        """Incremental materialization into the online store; returns the silver version per view."""
        self.ws.gate.enforce(Stage.MAINTAIN, actor, Resource.system("features"))
        if self.cfg.offline == "trino":
            from lakehouse.trino import check_server

            check_server(self.ws)
        end = end or datetime.now(timezone.utc)
        try:
            self.store.materialize_incremental(end_date=end)
        except Exception as exc:
            self._reraise_online(exc)
            raise
        versions = {}
        for obj in self.objects():
            tags = getattr(obj, "tags", None) or {}
            if "lakewarden.dataset" in tags:
                versions[obj.name] = self.catalog.open(TableRef("silver", tags["lakewarden.dataset"])).version()
        self.ws.lineage.emit(
            "features.materialize",
            inputs=[DatasetRef(f"silver.{self._view(v)[0].dataset}", version=ver) for v, ver in versions.items()],
            outputs=[DatasetRef(f"feature_view:{v}", version=ver, kind="feature_view") for v, ver in versions.items()],
        )
        self.ws.audit.record("features.materialize", actor=actor.name, outcome="ok", resource="system:features",
                             details={"views": versions, "end": end.isoformat()})
        return versions

    def _decide(self, actor: Actor, stage: Stage, pol: DatasetPolicy, purpose: str, columns: list[str]) -> Any:
        return self.ws.gate.enforce(stage, actor, Resource.dataset(pol.dataset), {"purpose": purpose, "columns": columns})

    def training_set(
        self,
        actor: Actor,
        *,
        purpose: str,
        features: list[str],
        label: str | None = None,
        entities: pa.Table | None = None,
        at: datetime | None = None,
        engine: str = "local",
    ) -> TrainingSet:
        """A point-in-time correct training set.

        ``entities`` has the subject key and ``event_timestamp`` (the time each label is
        valid); without it every subject of silver is used at ``at`` (default now) and
        ``label`` is taken from silver. Every entity row comes back, with NULLs where no
        feature value existed yet (Feast can drop such rows silently; this is checked).
        ``engine``: ``local`` joins through Feast's offline store in this process; ``ray``
        joins per subject bucket on a Ray cluster (:mod:`features.distributed`), for silver
        tables too large for one process. Both give the same table.
        """
        if engine not in ENGINES:
            raise FeatureError(f"unknown engine {engine!r} (choose one of: {', '.join(ENGINES)})")
        pol, columns = self.resolve(features)
        decision = self._decide(actor, Stage.FEATURES, pol, purpose, columns + ([label] if label else []))
        key = pol.subject_key
        silver_ref = TableRef("silver", pol.dataset)
        silver_version = self.catalog.open(silver_ref).version()
        if entities is None:
            cols = [key] + ([label] if label else [])
            base = self.catalog.open(silver_ref).to_pyarrow_table(columns=cols)
            when = at or datetime.now(timezone.utc)
            entities = base.append_column("event_timestamp", pa.array([when] * base.num_rows, pa.timestamp("us", tz="UTC")))
        if key not in entities.column_names or "event_timestamp" not in entities.column_names:
            raise FeatureError(f"entity rows need columns '{key}' and 'event_timestamp'")
        # Each distinct value is checked once: entity rows repeat subjects (one row per label time).
        values = pc.unique(entities[key])
        ok = pc.fill_null(pc.match_substring_regex(values, TOKEN_RE.pattern), False)
        if not pc.all(ok).as_py():
            wrong = pc.is_in(entities[key], value_set=values.filter(pc.invert(ok)))
            bad = pc.sum(pc.fill_null(wrong, True).cast(pa.int64())).as_py()  # a null key matches the null value
            raise FeatureError(f"{bad} entity row(s) do not hold a subject token in '{key}' (raw identifiers are never used)")
        n_in = entities.num_rows
        if engine == "ray":
            out = self._joined_on_ray(pol, features, entities, silver_ref, silver_version)
        else:
            out = self._joined_by_feast(features, entities)
        assert out.num_rows == n_in
        if pol.anonymity is not None:  # a training set is an export: k_min holds for it too (issue #20)
            from lakehouse.anonymity import ResultRefused, check_training_set

            try:
                check_training_set(self.ws, actor, pol, out)
            except ResultRefused as exc:
                self.ws.audit.record("features.training_set", actor=actor.name, outcome="deny", stage=Stage.FEATURES.value,
                                     resource=f"dataset:{pol.dataset}", rule_ids=tuple(exc.decision.rule_ids),
                                     details={"purpose": purpose, "features": features, "rows": n_in, "engine": engine,
                                              "reasons": list(exc.decision.reasons)})
                raise
        run_id = self.ws.lineage.emit(
            "features.training_set",
            inputs=[DatasetRef(str(silver_ref), version=silver_version)],
            outputs=[DatasetRef(f"training_set:{pol.dataset}:{purpose}", kind="training_set")],
            facets={"features": features, "purpose": purpose, "rows": n_in, "engine": engine},
        )
        self.ws.audit.record("features.training_set", actor=actor.name, outcome="ok", stage=Stage.FEATURES.value,
                             resource=f"dataset:{pol.dataset}",
                             details={"purpose": purpose, "features": features, "rows": n_in, "silver_version": silver_version,
                                      "engine": engine})
        return TrainingSet(out, pol.dataset, features, purpose, {str(silver_ref): silver_version}, run_id, decision)

    def _joined_by_feast(self, features: list[str], entities: pa.Table) -> pa.Table:
        """Feast's point-in-time join (this workspace's offline store), every entity row kept, in order."""
        n_in = entities.num_rows
        self._trino_scratch()
        entities = entities.append_column("_lw_row", pa.array(np.arange(n_in, dtype=np.int64)))
        job = self.store.get_historical_features(entity_df=entities.to_pandas(), features=features)
        out = job.to_arrow()
        if out.num_rows != n_in:
            # Put back entity rows Feast dropped (no feature value at or before their time).
            missing = pc.invert(pc.is_in(entities["_lw_row"], value_set=out["_lw_row"]))
            lost = entities.filter(missing)
            fill = {c: pa.nulls(lost.num_rows, out.schema.field(c).type) for c in out.column_names if c not in lost.column_names}
            for c, arr in fill.items():
                lost = lost.append_column(c, arr)
            out = pa.concat_tables([out, lost.select(out.column_names).cast(out.schema)])
        return _in_entity_order(out, n_in).drop(["_lw_row"])

    def _joined_on_ray(self, pol: DatasetPolicy, features: list[str], entities: pa.Table, silver_ref: TableRef,
                       silver_version: int) -> pa.Table:
        """The same join on a Ray cluster, per subject bucket of the pinned silver version."""
        from features.distributed import ViewJoin, point_in_time_on_ray

        wanted: dict[str, list[str]] = {}
        for ref in features:
            view, _, feat = ref.partition(":")
            wanted.setdefault(view, []).append(feat)
        views = [ViewJoin(v, pol.features[v].timestamp, pol.features[v].ttl, tuple(cols)) for v, cols in wanted.items()]
        types = {c: self._arrow_type(pol, c) for v in views for c in v.columns}
        joined = point_in_time_on_ray(self.ws.config, self.catalog.uri(silver_ref), silver_version, pol.subject_key,
                                      entities, views, types)
        out = entities
        for ref in features:
            feat = ref.partition(":")[2]
            if feat not in out.column_names:
                out = out.append_column(feat, joined[feat])
        return out

    def online(
        self, actor: Actor, *, purpose: str, features: list[str], tokens: list[str], as_dict: bool = False
    ) -> pa.Table | dict[str, list[Any]]:
        """Online feature values for subject tokens (gated as ``serve`` for the purpose): an Arrow
        table with the policy's types, or with ``as_dict`` the columns as Feast gives them
        (``{name: [values]}``, no Arrow conversion: about 25 µs less for one entity).

        A hot path: identical allow decisions are audited as a run (the first in full, then one
        ``gate.decide.repeat`` event counting the lookups and the entities they read; see
        :meth:`governance.gate.Gate.enforce_repeated`). A deny is audited and flushed each time.
        """
        pol, columns = self.resolve(features)
        self.ws.gate.enforce_repeated(Stage.SERVE, actor, Resource.dataset(pol.dataset),
                                      {"purpose": purpose, "columns": columns}, tally={"lookups": 1, "entities": len(tokens)})
        bad = [t for t in tokens if not isinstance(t, str) or not TOKEN_RE.match(t)]
        if bad:
            raise FeatureError(f"{len(bad)} entity value(s) are not subject tokens (raw identifiers are never used)")
        try:
            resp = self.store.get_online_features(features=features, entity_rows=[{pol.subject_key: t} for t in tokens])
        except Exception as exc:
            self._reraise_online(exc)
            raise
        values = resp.to_dict()
        if as_dict:
            return values
        key = tuple(features)
        schema = self._online_schemas.get(key)
        if schema is None:
            schema = self._online_schemas[key] = pa.schema(
                [(pol.subject_key, pa.string())] + [(c, self._arrow_type(pol, c)) for c in columns])
        if set(values) == set(schema.names):
            try:  # the declared types: no inference, half the conversion time of pa.table
                return pa.Table.from_pydict(values, schema=schema)
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                pass
        return pa.table(values)


def _in_entity_order(out: pa.Table, n: int) -> pa.Table:
    """``out`` in entity-row order by its ``_lw_row``: a scatter when it holds each row once, else a sort."""
    rows = out["_lw_row"].to_numpy()
    if len(rows) == n:
        if n < 2 or bool((rows[1:] > rows[:-1]).all()):
            return out  # already in order
        order = np.full(n, -1, dtype=np.int64)
        if rows.min() >= 0 and rows.max() < n:
            order[rows] = np.arange(n, dtype=np.int64)
            if (order >= 0).all():  # a permutation: every entity row exactly once
                return out.take(pa.array(order))
    return out.sort_by("_lw_row")


__all__ = ["Features", "FeatureError", "TrainingSet"]
