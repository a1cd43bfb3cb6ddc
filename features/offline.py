"""Feast offline store that reads governed Delta tables through deltalake.

Feast's DuckDB offline store reads a ``DeltaFormat`` source with DuckDB's ``delta``
extension, which DuckDB downloads at run time — impossible on machines without internet,
and a second Delta reader besides deltalake. This store is Feast's own DuckDB/ibis store
with one change: a Delta source is opened with ``deltalake`` (the same reader and version
semantics as the rest of Lakewarden, deletions honoured) and registered in ibis's DuckDB
backend as a pyarrow dataset, so DuckDB still pushes filters and projections down.
Everything else — point-in-time joins, TTLs, materialization — is Feast's code.

Configure with ``offline_store: {type: features.offline.LakewardenOfflineStore}``.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any

import ibis
from deltalake import DeltaTable
from feast.data_format import DeltaFormat
from feast.infra.offline_stores import duckdb as feast_duckdb
from feast.infra.offline_stores.ibis import (
    get_historical_features_ibis,
    pull_all_from_table_or_query_ibis,
    pull_latest_from_table_or_query_ibis,
)
from pydantic import StrictStr


def _read(data_source: Any, repo_path: str) -> Any:
    if isinstance(getattr(data_source, "file_format", None), DeltaFormat):
        backend = ibis.get_backend()
        dt = DeltaTable(data_source.path)
        name = "lw_" + hashlib.sha1(f"{data_source.path}@{dt.version()}".encode()).hexdigest()[:16]
        backend.con.register(name, dt.to_pyarrow_dataset())
        return backend.table(name)
    return feast_duckdb._read_data_source(data_source, repo_path)


class LakewardenOfflineStoreConfig(feast_duckdb.DuckDBOfflineStoreConfig):
    type: StrictStr = "features.offline.LakewardenOfflineStore"


class LakewardenOfflineStore(feast_duckdb.DuckDBOfflineStore):
    @staticmethod
    def pull_latest_from_table_or_query(config, data_source, join_key_columns, feature_name_columns,  # type: ignore[override]
                                        timestamp_field, created_timestamp_column, start_date: datetime,
                                        end_date: datetime):
        return pull_latest_from_table_or_query_ibis(
            config=config, data_source=data_source, join_key_columns=join_key_columns,
            feature_name_columns=feature_name_columns, timestamp_field=timestamp_field,
            created_timestamp_column=created_timestamp_column, start_date=start_date, end_date=end_date,
            data_source_reader=_read, data_source_writer=feast_duckdb._write_data_source,
            staging_location=config.offline_store.staging_location,
            staging_location_endpoint_override=config.offline_store.staging_location_endpoint_override,
        )

    @staticmethod
    def get_historical_features(config, feature_views, feature_refs, entity_df, registry, project,  # type: ignore[override]
                                full_feature_names: bool = False, filter_by_created_timestamp: bool = False):
        return get_historical_features_ibis(
            config=config, feature_views=feature_views, feature_refs=feature_refs, entity_df=entity_df,
            registry=registry, project=project, full_feature_names=full_feature_names,
            data_source_reader=_read, data_source_writer=feast_duckdb._write_data_source,
            staging_location=config.offline_store.staging_location,
            staging_location_endpoint_override=config.offline_store.staging_location_endpoint_override,
            filter_by_created_timestamp=filter_by_created_timestamp,
        )

    @staticmethod
    def pull_all_from_table_or_query(config, data_source, join_key_columns, feature_name_columns,  # type: ignore[override]
                                     timestamp_field, created_timestamp_column=None, start_date=None, end_date=None):
        return pull_all_from_table_or_query_ibis(
            config=config, data_source=data_source, join_key_columns=join_key_columns,
            feature_name_columns=feature_name_columns, timestamp_field=timestamp_field,
            created_timestamp_column=created_timestamp_column, start_date=start_date, end_date=end_date,
            data_source_reader=_read, data_source_writer=feast_duckdb._write_data_source,
            staging_location=config.offline_store.staging_location,
            staging_location_endpoint_override=config.offline_store.staging_location_endpoint_override,
        )
