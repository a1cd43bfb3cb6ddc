"""KServe manifests for registered model versions: render, validate, write.

One registered version (``credit@1``) becomes one ``InferenceService`` built from the kserve
SDK's typed objects (``V1beta1InferenceService``, ``V1beta1PredictorSpec`` with a custom
container, Kubernetes ``V1Container``/``V1Probe``/...) and serialized by the SDK's
``ApiClient``. The predictor image runs ``lakewarden serve --model <name>@<version>`` (KServe's
Python ``ModelServer``, open inference protocol v2 on port 8080); KServe's storage initializer
puts the version's registry folder from ``pvc://lakewarden-models/<name>/<version>`` at
``/mnt/models`` — or, for a registry kept in a bucket (``storage.root: s3://...``), from the
version's ``s3://bucket/prefix/models/<name>/<version>`` (``storage_uri``; the storage
initializer takes the bucket's credentials from the service account's secret, never from the
manifest). What a reviewer or an operator needs to trace the deployment back to its card
travels in labels and annotations: model, version, dataset, ε (and δ), what the model's build
spent of the budget (``epsilon-spent``/``delta-spent``, ``unknown`` on older cards), status, who
approved and the sha256 of the card — never free text and never personal data (every value is scanned with
:func:`governance.pii.find_pii`; a hit refuses the render).

**HTTPS.** With ``tls`` (by default: when the configuration names ``serving.tls_cert``) the
predictor serves HTTPS from a Kubernetes Secret of type ``kubernetes.io/tls`` — by default
``<isvc name>-tls``, created by the operator (``kubectl create secret tls``; cert-manager) and
never by this module: the manifest names the Secret and mounts it read-only at ``/etc/lakewarden-tls``
(mode 0440, group-readable through the pod's ``fsGroup``: the container runs as non-root), and
``lakewarden serve`` reads ``tls.crt``/``tls.key`` from there (``--tls-cert``/``--tls-key``). No
certificate or key is ever written into the manifest (:func:`validate` refuses PEM text). The
probes use ``scheme: HTTPS``, and the InferenceService asks for KServe's ``RawDeployment`` mode:
Knative's queue-proxy would speak plain HTTP to the container. With ``auth.enabled`` and no TLS,
the render is refused (:class:`governance.tls.PlaintextRefused`): bearer tokens never travel in clear.

Rendering is not deploying: the deploy gate (``Stage.DEPLOY`` on
:meth:`ModelCard.deploy_context`) decides before ``lakewarden deploy --target k8s`` calls
:func:`write_manifest`. Nothing here talks to a cluster.

Example::

    card = Registry(ws).card("credit@1")
    obj = render_inference_service(card)              # a plain dict, the SDK object serialized
    assert validate(obj) == []                        # structure + SDK round trip
    path = write_manifest(card, Path("infra/k8s"))    # infra/k8s/credit-v1.yaml

Errors: caller mistakes (replicas, resources, a namespace too long to leave room for a name,
personal data in a card value) raise ``ValueError``; a missing kserve SDK raises
``ImportError`` with the install hint. :func:`validate` never raises on a bad manifest: it
returns the problems.

``python -m serving.manifests [out_dir]`` re-renders the example for :func:`example_card`
into ``infra/k8s/`` (the tests check that the committed file is current).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from governance.pii import find_pii
from governance.policy import IDENT
from training.registry import Approval, FairnessReport, LedgerRunCost, ModelCard, PrivacyCost, PrivacyGuarantee

if TYPE_CHECKING:
    from governance.config import ProjectConfig

__all__ = [
    "API_VERSION",
    "CONTAINER_NAME",
    "DEFAULT_IMAGE",
    "KIND",
    "LIVENESS_PATH",
    "MODEL_DIR",
    "READINESS_PATH",
    "Resources",
    "STORAGE_SCHEMES",
    "TLS_DIR",
    "example_card",
    "inference_service_name",
    "render_inference_service",
    "tls_secret_name",
    "to_yaml",
    "validate",
    "write_manifest",
]

API_VERSION = "serving.kserve.io/v1beta1"
KIND = "InferenceService"
CONTAINER_NAME = "kserve-container"  # the name KServe gives (and expects of) the predictor container
HTTP_PORT = 8080  # ModelServer's default --http_port
READINESS_PATH = "/v2/health/ready"
LIVENESS_PATH = "/v2/health/live"
METRICS_PATH = "/metrics"
MODEL_DIR = "/mnt/models"  # where KServe's storage initializer puts STORAGE_URI
CONFIG_DIR = "/etc/lakewarden"
TLS_DIR = "/etc/lakewarden-tls"  # the kubernetes.io/tls Secret: tls.crt and tls.key
TLS_FILE_MODE = 0o440  # owner root, group the pod's fsGroup: readable by the non-root server, never by others
TLS_FS_GROUP = 2000  # the pod's fsGroup: the group the Secret's files belong to (added to the server's groups)
_PEM = re.compile(r"-----BEGIN [A-Z0-9 ]+-----")
LABEL_PREFIX = "lakewarden.io/"

_HOST_SUFFIX = "-predictor-"  # KServe's default host label: <isvc>-predictor-<namespace>
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_LIST_TYPE = re.compile(r"^List\[(.*)\]$")
_DICT_TYPE = re.compile(r"^Dict\[str, (.*)\]$")
_INSTALL_HINT = "rendering KServe manifests needs the kserve SDK: pip install 'kserve>=0.21'"


def _package_version() -> str:
    try:
        return metadata.version("lakewarden")
    except metadata.PackageNotFoundError:  # running from a checkout that was never installed
        return "dev"


DEFAULT_IMAGE = f"lakewarden/predictor:{_package_version()}"


def _quantity(value: Any) -> Decimal | None:
    from kubernetes.utils.quantity import parse_quantity

    try:
        return Decimal(parse_quantity(value))
    except (ValueError, TypeError, InvalidOperation):
        return None


@dataclass(frozen=True, kw_only=True, slots=True)
class Resources:
    """Requests and limits of the predictor container, as Kubernetes quantities.

    Raises:
        ValueError: a quantity does not parse, or a limit is below its request.
    """

    cpu_request: str = "500m"
    memory_request: str = "1Gi"
    cpu_limit: str = "1"
    memory_limit: str = "2Gi"

    def __post_init__(self) -> None:
        for what in ("cpu", "memory"):
            req = _quantity(getattr(self, f"{what}_request"))
            lim = _quantity(getattr(self, f"{what}_limit"))
            if req is None or lim is None:
                raise ValueError(f"{what} request/limit must be Kubernetes quantities (e.g. 500m, 2Gi), got {self!r}")
            if lim < req:
                raise ValueError(f"{what} limit {getattr(self, f'{what}_limit')} is below its request "
                                 f"{getattr(self, f'{what}_request')}")

    def requests(self) -> dict[str, str]:
        return {"cpu": self.cpu_request, "memory": self.memory_request}

    def limits(self) -> dict[str, str]:
        return {"cpu": self.cpu_limit, "memory": self.memory_limit}


# --------------------------------------------------------------------------- SDK access


def _sdk() -> tuple[Any, Any]:
    """``(kserve, kubernetes.client)``, imported on first use (kserve takes ~1 s to import)."""
    try:
        import kserve
        from kubernetes import client
    except ImportError as exc:  # pragma: no cover - the venv has both
        raise ImportError(_INSTALL_HINT) from exc
    return kserve, client


def _sanitize(obj: Any) -> Any:
    """The SDK object as the API server reads it: JSON field names, ``None`` fields left out.

    kserve's ``ApiClient`` does this, not ``kubernetes.client.ApiClient``: from kubernetes
    client 37 on, the latter serializes a kserve object through its ``to_dict()``, which gives
    Python attribute names (``api_version``, ``readiness_probe``) and every unset field as null.
    kserve's walks ``openapi_types``/``attribute_map``, which the Kubernetes models still carry.
    """
    kserve, _ = _sdk()
    return kserve.ApiClient().sanitize_for_serialization(obj)


def _deserialize(data: Mapping[str, Any]) -> Any:
    """The SDK's own deserializer, fed a fake response, with Kubernetes types resolved.

    kserve's generated ``ApiClient`` resolves type names in ``kserve.models`` only, but an
    InferenceService embeds Kubernetes types (``V1ObjectMeta``, ``V1Container``, ...), and the
    Kubernetes client (37+) spells containers ``List[X]``/``Dict[str, X]`` where kserve's
    deserializer expects ``list[X]``/``dict(str, X)`` (kserve/kserve#6234 fixes both upstream,
    open at kserve 0.21). The subclass translates the spelling and falls back to
    ``kubernetes.client.models``; everything else — how fields map, which fields are required,
    how primitives coerce — is the SDKs'.
    """
    kserve, client = _sdk()

    class _Client(kserve.ApiClient):  # type: ignore[misc, name-defined]
        def _ApiClient__deserialize(self, data: Any, klass: Any) -> Any:  # the generated private hook
            if isinstance(klass, str):
                if m := _LIST_TYPE.match(klass):
                    klass = f"list[{m.group(1)}]"
                elif m := _DICT_TYPE.match(klass):
                    klass = f"dict(str, {m.group(1)})"
                elif (
                    not klass.startswith(("list[", "dict("))
                    and klass not in self.NATIVE_TYPES_MAPPING
                    and not hasattr(kserve.models, klass)
                ):
                    klass = getattr(client.models, klass)
            return super()._ApiClient__deserialize(data, klass)

    class _Response:
        def __init__(self, body: str) -> None:
            self.data = body

    return _Client().deserialize(_Response(json.dumps(data)), "V1beta1InferenceService")


# --------------------------------------------------------------------------- names


def inference_service_name(name: str, version: int, *, namespace: str = "lakewarden") -> str:
    """``credit``, 1 -> ``credit-v1``: a DNS-1123 label that leaves room for KServe's host name.

    KServe names the predictor's host ``<isvc>-predictor-<namespace>``, and that must be one
    DNS label (≤ 63 characters), so a name is cut to ``52 - len(namespace)`` characters. A cut
    name keeps its ``-v<version>`` and gains six hex characters of the full name's sha256, so two
    long names that share a prefix stay distinct. Underscores become ``-`` (registry names are
    ``lower_snake_case``, so the mapping is one-to-one before any cut).

    Raises:
        ValueError: not a registry name or version, or the namespace leaves no room for a name.

    >>> inference_service_name("credit", 1)
    'credit-v1'
    """
    if not isinstance(name, str) or not re.match(IDENT, name):
        raise ValueError(f"model name {name!r} must be a registry name (lower_snake_case, starting with a letter)")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"model version must be an int >= 1, got {version!r}")
    budget = min(63, 63 - len(_HOST_SUFFIX) - len(namespace))
    base = name.replace("_", "-")
    suffix = f"-v{version}"
    full = base + suffix
    if len(full) <= budget:
        return full
    digest = hashlib.sha256(name.encode()).hexdigest()[:6]
    keep = budget - len(suffix) - len(digest) - 1
    if keep < 1:
        raise ValueError(
            f"namespace '{namespace}' ({len(namespace)} characters) leaves no room for an InferenceService name: "
            f"'<name>{_HOST_SUFFIX}<namespace>' must fit in 63 characters; use a shorter namespace"
        )
    return f"{base[:keep].rstrip('-')}-{digest}{suffix}"


def tls_secret_name(name: str, version: int, *, namespace: str = "lakewarden") -> str:
    """The Secret a version's predictor reads its certificate from: ``<isvc name>-tls``.

    >>> tls_secret_name("credit", 1)
    'credit-v1-tls'
    """
    return f"{inference_service_name(name, version, namespace=namespace)}-tls"


def _storage_uri(card: ModelCard, pvc: str) -> str:
    return f"pvc://{pvc}/{card.name}/{card.version}"


STORAGE_SCHEMES = ("pvc", "s3", "gs")  # where KServe's storage initializer fetches a registry folder from


def _storage_problems(uri: Any) -> list[str]:
    """Why ``uri`` cannot be the STORAGE_URI of a predictor (empty: it can)."""
    from urllib.parse import urlsplit

    if not isinstance(uri, str) or not uri:
        return ["STORAGE_URI must be a URI"]
    u = urlsplit(uri)
    out = []
    if u.scheme not in STORAGE_SCHEMES:
        out.append(f"STORAGE_URI {uri!r} must be one of {', '.join(s + '://' for s in STORAGE_SCHEMES)}")
    if "@" in u.netloc or u.query or u.fragment:
        out.append("STORAGE_URI must name a location only (no credentials, query or fragment): "
                   "credentials come from the service account's secret")
    if not u.netloc or not u.path.strip("/"):
        out.append(f"STORAGE_URI {uri!r} must name a bucket or claim and the version's folder in it")
    return out


def _card_sha256(card: ModelCard) -> str:
    return hashlib.sha256(card.to_json().encode()).hexdigest()


# --------------------------------------------------------------------------- render


def _metadata_maps(card: ModelCard) -> tuple[dict[str, str], dict[str, str]]:
    eps = repr(float(card.privacy.epsilon))
    cost = card.privacy.cost  # what the build spent of the budget; None: unknown (an older card)
    labels = {
        "app.kubernetes.io/name": "lakewarden-predictor",
        "app.kubernetes.io/part-of": "lakewarden",
        "app.kubernetes.io/managed-by": "lakewarden",
        f"{LABEL_PREFIX}model": card.name,
        f"{LABEL_PREFIX}model-version": str(card.version),
        f"{LABEL_PREFIX}dataset": card.dataset,
        f"{LABEL_PREFIX}epsilon": eps,
        f"{LABEL_PREFIX}status": card.status,
    }
    approvals = [
        {"actor": a.actor, "role": a.role, "at": a.at.isoformat(), "override": a.override_reason is not None}
        for a in card.approvals
    ]  # an override's reason is free text: the card keeps it, the cluster does not
    annotations = {
        "serving.kserve.io/enable-prometheus-scraping": "true",
        f"{LABEL_PREFIX}model-ref": str(card.ref),
        f"{LABEL_PREFIX}dataset": card.dataset,
        f"{LABEL_PREFIX}purpose": card.purpose,
        f"{LABEL_PREFIX}epsilon": eps,
        f"{LABEL_PREFIX}delta": repr(float(card.privacy.delta)),
        f"{LABEL_PREFIX}accountant": card.privacy.accountant,
        f"{LABEL_PREFIX}epsilon-spent": "unknown" if cost is None else repr(float(cost.epsilon)),
        f"{LABEL_PREFIX}delta-spent": "unknown" if cost is None else repr(float(cost.delta)),
        f"{LABEL_PREFIX}approved-by": ",".join(dict.fromkeys(a.actor for a in card.approvals)),
        f"{LABEL_PREFIX}approvals": json.dumps(approvals, sort_keys=True, separators=(",", ":")),
        f"{LABEL_PREFIX}card-sha256": _card_sha256(card),
    }
    return labels, annotations


# Values the system writes itself from typed card fields (numbers, a digest): not free text, so not
# scanned — a float's digits are not a card number. Names, dataset, purpose and principals are.
_TYPED_KEYS = frozenset(f"{LABEL_PREFIX}{k}" for k in ("model-version", "epsilon", "delta", "epsilon-spent",
                                                         "delta-spent", "card-sha256"))


def _refuse_personal(values: Mapping[str, str], where: str) -> None:
    for key, value in values.items():
        if key in _TYPED_KEYS:
            continue
        hit = next(find_pii(value), None)
        if hit is not None:
            raise ValueError(
                f"{where}['{key}'] would carry something that looks like personal data ({hit[0]}); "
                "manifests carry policy vocabulary and principal names only — fix the model card"
            )


def render_inference_service(
    card: ModelCard,
    *,
    namespace: str = "lakewarden",
    image: str = DEFAULT_IMAGE,
    replicas: tuple[int, int] = (1, 3),
    resources: Resources = Resources(),
    service_account: str = "lakewarden-predictor",
    models_pvc: str = "lakewarden-models",
    storage_uri: str | None = None,
    config_map: str = "lakewarden-config",
    secret: str = "lakewarden-predictor",
    tls: bool | None = None,
    tls_secret: str | None = None,
    config: "ProjectConfig | None" = None,
) -> dict[str, Any]:
    """The KServe ``InferenceService`` for one model version, as a plain dict.

    Built from the SDK's typed objects, serialized by the SDK's ``ApiClient`` (see ``_sanitize``).

    Args:
        card: the version's model card (``Registry(ws).card(ref)``).
        namespace: the Kubernetes namespace.
        image: the predictor image (runs ``lakewarden serve --model <name>@<version>``).
        replicas: ``(min, max)`` predictor replicas, ``0 <= min <= max``, ``max >= 1``.
        resources: requests and limits of the predictor container.
        service_account: the pod's service account.
        models_pvc: the claim holding the registry's ``<name>/<version>/`` folders.
        storage_uri: where the version's folder is instead of the claim: the ``s3://`` URI of a
            registry kept in a bucket (``Registry(ws).uri(ref)``); it must end in
            ``/<name>/<version>``. The storage initializer reads it with the credentials of the
            service account's secret (KServe's ``serving.kserve.io/s3-*`` annotations).
        config_map: the ConfigMap holding ``lakewarden.yaml`` (mounted at ``/etc/lakewarden``).
        secret: the Secret whose keys become environment variables: the KEK the configuration's
            ``keys.kek`` names (``LAKEWARDEN_KEK``) and ``LAKEWARDEN_USER``, the principal the
            serve gate checks. Never written into the manifest.
        tls: serve HTTPS from a ``kubernetes.io/tls`` Secret (see the module docstring). None: as
            ``config`` says (``serving.tls_cert`` set), or plain HTTP without a config.
        tls_secret: that Secret's name (default :func:`tls_secret_name`); giving one implies ``tls``.
        config: the project configuration: decides ``tls`` when it is None, and with
            ``auth.enabled`` refuses a plain-HTTP predictor.

    Returns:
        The manifest, ready for :func:`to_yaml` / :func:`validate`.

    Raises:
        ValueError: bad replicas, a namespace or image that cannot be used, or a label or
            annotation value that looks like personal data.
        PlaintextRefused: ``config`` has ``auth.enabled`` and the predictor would serve plain HTTP.

    >>> obj = render_inference_service(example_card())
    >>> obj["metadata"]["name"], obj["spec"]["predictor"]["minReplicas"]
    ('credit-v1', 1)
    """
    name = inference_service_name(card.name, card.version, namespace=namespace)
    if tls_secret is not None:
        if tls is False:
            raise ValueError("tls_secret names the predictor's TLS Secret: it cannot go with tls=False")
        if len(tls_secret) > 253 or not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", tls_secret):
            raise ValueError(f"tls_secret {tls_secret!r} is not a Kubernetes Secret name (DNS-1123 subdomain)")
        tls = True
    if tls is None:
        tls = config is not None and config.serving.tls_cert is not None
    if not tls and config is not None:
        from governance.tls import refuse_plaintext

        refuse_plaintext(config, "the predictor", f"InferenceService {namespace}/{name}",
                         hint="set serving.tls_cert/tls_key (the predictor then reads a kubernetes.io/tls Secret "
                              f"named {name}-tls), or render with tls=True")
    if tls and tls_secret is None:
        tls_secret = f"{name}-tls"
    kserve, k8s = _sdk()
    lo, hi = replicas
    if any(isinstance(r, bool) or not isinstance(r, int) for r in replicas) or lo < 0 or hi < 1 or lo > hi:
        raise ValueError(f"replicas must be (min, max) ints with 0 <= min <= max and max >= 1, got {replicas!r}")
    if not _DNS_LABEL.match(namespace) or len(namespace) > 63:
        raise ValueError(f"namespace {namespace!r} is not a DNS-1123 label (lowercase a-z, 0-9 and '-', ≤ 63)")
    if not image or any(c.isspace() for c in image):
        raise ValueError(f"image must be a container image reference, got {image!r}")
    if storage_uri is None:
        storage_uri = _storage_uri(card, models_pvc)
    else:
        bad = _storage_problems(storage_uri)
        if not bad and not storage_uri.rstrip("/").endswith(f"/{card.name}/{card.version}"):
            bad = [f"storage_uri {storage_uri!r} is not the folder of {card.ref} (…/{card.name}/{card.version})"]
        if bad:
            raise ValueError("; ".join(bad))

    labels, annotations = _metadata_maps(card)
    _refuse_personal(labels, "metadata.labels")
    _refuse_personal(annotations, "metadata.annotations")
    for key, value in labels.items():
        if len(value) > 63 or not _LABEL_VALUE.match(value):
            raise ValueError(f"label {key}={value!r} is not a valid Kubernetes label value")

    probe = lambda path, delay: k8s.V1Probe(  # noqa: E731
        http_get=k8s.V1HTTPGetAction(path=path, port=HTTP_PORT, scheme="HTTPS" if tls else None),
        initial_delay_seconds=delay,
        period_seconds=10,
        timeout_seconds=5,
        failure_threshold=3,
    )
    container = k8s.V1Container(
        name=CONTAINER_NAME,
        image=image,
        command=["lakewarden"],
        args=["serve", "--model", str(card.ref),
              *(["--tls-cert", f"{TLS_DIR}/tls.crt", "--tls-key", f"{TLS_DIR}/tls.key"] if tls else [])],
        ports=[k8s.V1ContainerPort(container_port=HTTP_PORT, name="http1", protocol="TCP")],
        env=[
            k8s.V1EnvVar(name="LAKEWARDEN_CONFIG", value=f"{CONFIG_DIR}/lakewarden.yaml"),
            k8s.V1EnvVar(name="LAKEWARDEN_MODEL_DIR", value=MODEL_DIR),
            k8s.V1EnvVar(name="STORAGE_URI", value=storage_uri.rstrip("/")),  # KServe puts it at MODEL_DIR
        ],
        env_from=[k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=secret))],
        resources=k8s.V1ResourceRequirements(requests=resources.requests(), limits=resources.limits()),
        readiness_probe=probe(READINESS_PATH, 5),
        liveness_probe=probe(LIVENESS_PATH, 15),
        volume_mounts=[
            k8s.V1VolumeMount(name="lakewarden-config", mount_path=CONFIG_DIR, read_only=True),
            *([k8s.V1VolumeMount(name="lakewarden-tls", mount_path=TLS_DIR, read_only=True)] if tls else []),
        ],
        security_context=k8s.V1SecurityContext(
            allow_privilege_escalation=False,
            run_as_non_root=True,
            capabilities=k8s.V1Capabilities(drop=["ALL"]),
        ),
    )
    volumes = [k8s.V1Volume(name="lakewarden-config", config_map=k8s.V1ConfigMapVolumeSource(name=config_map))]
    if tls:  # the Secret by name: its key and certificate never pass through here
        volumes.append(k8s.V1Volume(name="lakewarden-tls", secret=k8s.V1SecretVolumeSource(
            secret_name=tls_secret, default_mode=TLS_FILE_MODE,
            items=[k8s.V1KeyToPath(key="tls.crt", path="tls.crt"), k8s.V1KeyToPath(key="tls.key", path="tls.key")])))
        annotations = {**annotations, "serving.kserve.io/deploymentMode": "RawDeployment",
                       f"{LABEL_PREFIX}tls-secret": tls_secret}
    predictor = kserve.V1beta1PredictorSpec(
        min_replicas=lo,
        max_replicas=hi,
        service_account_name=service_account,
        annotations={"prometheus.kserve.io/port": str(HTTP_PORT), "prometheus.kserve.io/path": METRICS_PATH},
        containers=[container],
        volumes=volumes,
        security_context=k8s.V1PodSecurityContext(fs_group=TLS_FS_GROUP) if tls else None,
    )
    isvc = kserve.V1beta1InferenceService(
        api_version=API_VERSION,
        kind=KIND,
        metadata=k8s.V1ObjectMeta(
            name=name,
            namespace=namespace,
            labels=labels,
            annotations=annotations,
        ),
        spec=kserve.V1beta1InferenceServiceSpec(predictor=predictor),
    )
    return _sanitize(isvc)


# --------------------------------------------------------------------------- YAML and files


# Strings a YAML 1.2 / go-yaml reader (kubectl) would take for a number, bool or null although
# PyYAML (YAML 1.1) would not quote them: "1e-05", "0o17", ".5", "on", "~" ...
_AMBIGUOUS = re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)|0[xX][0-9a-fA-F_]+|0[oO]?[0-7_]+|0[bB][01_]+"
    r"|(?i:y|n|yes|no|on|off|true|false|null)|~|)$"
)


class _Dumper(yaml.SafeDumper):
    """SafeDumper that also quotes strings other YAML readers would resolve to non-strings."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "'" if _AMBIGUOUS.match(value) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def to_yaml(obj: Any) -> str:
    """Block-style YAML with sorted keys (the same object always gives the same text).

    ``obj`` is a manifest dict or an SDK object (serialized first). Strings that a YAML 1.2
    reader such as kubectl's would take for a number (``1e-05``) are quoted, so an annotation
    stays a string.
    """
    data = obj if isinstance(obj, Mapping) else _sanitize(obj)
    return yaml.dump(data, Dumper=_Dumper, sort_keys=True, default_flow_style=False, allow_unicode=False, width=120)


def _header(card: ModelCard) -> str:
    return (
        f"# KServe InferenceService for model {card.ref} (dataset {card.dataset}).\n"
        "# Rendered by serving.manifests from the model card: regenerate, do not edit.\n"
    )


def write_manifest(card: ModelCard, out_dir: Path | str, **options: Any) -> Path:
    """Render, validate and write ``<out_dir>/<name>-v<version>.yaml``; return its path.

    ``options`` are :func:`render_inference_service`'s keywords.

    Raises:
        ValueError: the rendered manifest does not validate (a bug, or options that break it).
        PlaintextRefused: ``config`` has ``auth.enabled`` and the predictor would serve plain HTTP.
    """
    obj = render_inference_service(card, **options)
    problems = validate(obj)
    if problems:
        raise ValueError(f"the manifest for {card.ref} does not validate: " + "; ".join(problems))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{card.name}-v{card.version}.yaml"
    path.write_text(_header(card) + to_yaml(obj), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- validate


def _check_string_map(value: Any, where: str, *, label_values: bool = False) -> Iterator[str]:
    if value is None:
        return
    if not isinstance(value, Mapping):
        yield f"{where} must be a mapping of strings"
        return
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str):
            yield f"{where}['{k}'] must be a string, got {type(v).__name__}"
            continue
        if label_values and (len(v) > 63 or not _LABEL_VALUE.match(v)):
            yield f"{where}['{k}'] = {v!r} is not a valid label value (≤ 63 alphanumerics, '-', '_', '.')"
        hit = None if k in _TYPED_KEYS else next(find_pii(v), None)
        if hit is not None:
            yield f"{where}['{k}'] looks like personal data ({hit[0]})"


def _check_probe(c: Mapping[str, Any], key: str, path: str, ports: set[Any], where: str) -> Iterator[str]:
    probe = c.get(key)
    get = probe.get("httpGet") if isinstance(probe, Mapping) else None
    if not isinstance(get, Mapping):
        yield f"{where}.{key} must be an httpGet probe on {path}"
        return
    if get.get("path") != path:
        yield f"{where}.{key}.httpGet.path is {get.get('path')!r}, expected {path!r}"
    if ports and get.get("port") not in ports:
        yield f"{where}.{key}.httpGet.port {get.get('port')!r} is not the container's port ({', '.join(map(str, sorted(ports)))})"


def _check_resources(res: Any, where: str) -> Iterator[str]:
    if not isinstance(res, Mapping) or not res.get("requests") or not res.get("limits"):
        yield f"{where} must set requests and limits"
        return
    req, lim = res["requests"], res["limits"]
    for name, value in [*(("requests." + k, v) for k, v in req.items()), *(("limits." + k, v) for k, v in lim.items())]:
        if _quantity(value) is None:
            yield f"{where}.{name} {value!r} is not a Kubernetes quantity"
    for k, r in req.items():
        if k in lim and _quantity(r) is not None and _quantity(lim[k]) is not None and _quantity(lim[k]) < _quantity(r):
            yield f"{where}: limits.{k} {lim[k]} is below requests.{k} {r}"


def _structure(obj: Mapping[str, Any]) -> Iterator[str]:
    if obj.get("apiVersion") != API_VERSION:
        yield f"apiVersion is {obj.get('apiVersion')!r}, expected {API_VERSION!r}"
    if obj.get("kind") != KIND:
        yield f"kind is {obj.get('kind')!r}, expected {KIND!r}"

    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        yield "metadata is missing"
        meta = {}
    name, ns = meta.get("name"), meta.get("namespace")
    if not isinstance(name, str) or not name:
        yield "metadata.name is missing"
    elif len(name) > 63 or not _DNS_LABEL.match(name):
        yield (f"metadata.name {name!r} is not a DNS-1123 label "
               "(≤ 63 characters: lowercase a-z, 0-9 and '-', alphanumeric at both ends)")
    if not isinstance(ns, str) or not ns:
        yield "metadata.namespace is missing"
    elif len(ns) > 63 or not _DNS_LABEL.match(ns):
        yield f"metadata.namespace {ns!r} is not a DNS-1123 label"
    if isinstance(name, str) and isinstance(ns, str) and name and ns:
        host = f"{name}{_HOST_SUFFIX}{ns}"
        if len(host) > 63:
            yield (f"KServe's predictor host label '{host}' is {len(host)} characters (> 63): "
                   "shorten metadata.name or the namespace")
    yield from _check_string_map(meta.get("labels"), "metadata.labels", label_values=True)
    yield from _check_string_map(meta.get("annotations"), "metadata.annotations")

    spec = obj.get("spec")
    pred = spec.get("predictor") if isinstance(spec, Mapping) else None
    if not isinstance(pred, Mapping):
        yield "spec.predictor is missing"
        return
    yield from _check_string_map(pred.get("labels"), "spec.predictor.labels", label_values=True)
    yield from _check_string_map(pred.get("annotations"), "spec.predictor.annotations")
    lo, hi = pred.get("minReplicas"), pred.get("maxReplicas")
    for key, v in (("minReplicas", lo), ("maxReplicas", hi)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            yield f"spec.predictor.{key} must be an int >= 0, got {v!r}"
    if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
        yield f"spec.predictor.minReplicas {lo} is above maxReplicas {hi}"
    if not pred.get("serviceAccountName"):
        yield "spec.predictor.serviceAccountName is missing"

    containers = pred.get("containers")
    if not isinstance(containers, list) or len(containers) != 1:
        n = len(containers) if isinstance(containers, list) else 0
        yield f"spec.predictor must have exactly one container, has {n}"
        return
    c = containers[0]
    where = "spec.predictor.containers[0]"
    if not isinstance(c, Mapping):
        yield f"{where} is not a mapping"
        return
    if not c.get("image"):
        yield f"{where}.image is missing"
    ports = {p.get("containerPort") for p in c.get("ports") or () if isinstance(p, Mapping)}
    ports.discard(None)
    yield from _check_probe(c, "readinessProbe", READINESS_PATH, ports, where)
    yield from _check_probe(c, "livenessProbe", LIVENESS_PATH, ports, where)
    yield from _check_resources(c.get("resources"), f"{where}.resources")
    env = {e.get("name"): e.get("value") for e in c.get("env") or () if isinstance(e, Mapping)}
    if not env.get("LAKEWARDEN_CONFIG"):
        yield f"{where}.env has no LAKEWARDEN_CONFIG"
    if not env.get("STORAGE_URI") and not c.get("volumeMounts"):
        yield f"{where} gets no model artifacts (no STORAGE_URI env and no volume mount)"
    elif env.get("STORAGE_URI"):
        yield from (f"{where}.env: {p}" for p in _storage_problems(env["STORAGE_URI"]))
    yield from _tls_problems(pred, c, where)


def _tls_problems(pred: Mapping[str, Any], c: Mapping[str, Any], where: str) -> Iterator[str]:
    """Secrets mounted read-only; with ``--tls-cert``: the files from a mounted Secret, HTTPS probes."""
    volumes = {v.get("name"): v for v in pred.get("volumes") or () if isinstance(v, Mapping)}
    secret_mounts = {}
    for i, m in enumerate(c.get("volumeMounts") or ()):
        if isinstance(m, Mapping) and isinstance(volumes.get(m.get("name")), Mapping) and "secret" in volumes[m.get("name")]:
            secret_mounts[m.get("mountPath")] = m
            if m.get("readOnly") is not True:
                yield f"{where}.volumeMounts[{i}] mounts the Secret volume '{m.get('name')}' writable: mount it readOnly"
    args = [a for a in c.get("args") or () if isinstance(a, str)]
    if "--tls-cert" not in args and "--tls-key" not in args:
        return
    for flag in ("--tls-cert", "--tls-key"):
        at = args.index(flag) + 1 if flag in args else None
        path = args[at] if at is not None and at < len(args) else None
        if path is None or not any(isinstance(d, str) and path.startswith(d.rstrip("/") + "/") for d in secret_mounts):
            yield f"{where}.args: {flag} must name a file of a mounted Secret volume (kubernetes.io/tls), got {path!r}"
    for key in ("readinessProbe", "livenessProbe"):
        get = (c.get(key) or {}).get("httpGet") if isinstance(c.get(key), Mapping) else None
        if isinstance(get, Mapping) and get.get("scheme") != "HTTPS":
            yield f"{where}.{key}.httpGet.scheme must be HTTPS: the predictor serves TLS only"


def _sdk_error(exc: Exception) -> str:
    """One line per problem, without pydantic's dump of the input (it would echo the manifest)."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            items = errors(include_input=False, include_url=False)
        except TypeError:
            items = None
        if items:
            title = getattr(exc, "title", "")
            return "; ".join(
                f"{title}.{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}".lstrip(".")
                for e in items
            )
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _diff(a: Any, b: Any, path: str) -> Iterator[str]:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for k in a:
            sub = f"{path}.{k}" if path else str(k)
            if k not in b:
                yield f"{sub}: not a field the SDK knows (dropped on deserialization)"
            else:
                yield from _diff(a[k], b[k], sub)
        for k in b:
            if k not in a:
                yield f"{path}.{k}: added by the SDK" if path else f"{k}: added by the SDK"
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            yield from _diff(x, y, f"{path}[{i}]")
    elif a != b or type(a) is not type(b):
        yield f"{path}: {a!r} reads back as {b!r}"


def validate(obj: Any) -> list[str]:
    """The problems of a rendered manifest; an empty list means it is valid.

    Structure: apiVersion and kind; ``metadata.name`` a DNS-1123 label that leaves room for
    KServe's predictor host label; namespace set; label and annotation values strings (label
    values valid, none looking like personal data); a predictor with exactly one container
    that has an image, readiness and liveness probes on ``/v2/health/ready`` and
    ``/v2/health/live``, requests and limits with every limit ≥ its request, LAKEWARDEN_CONFIG,
    model artifacts (a ``STORAGE_URI`` on a claim or a bucket, naming no credentials);
    ``minReplicas ≤ maxReplicas``; a service account; Secret volumes mounted read-only, and with
    ``--tls-cert``/``--tls-key`` both naming files of a mounted Secret and HTTPS probes; no PEM
    text anywhere (a certificate or key belongs in a Secret, never in the manifest). Then the SDK round trip: the dict is deserialized into ``V1beta1InferenceService`` by kserve's own deserializer and
    serialized again; a field the SDK does not know, a value it coerces, or a required field it
    rejects is a problem.

    >>> validate(render_inference_service(example_card()))
    []
    """
    if not isinstance(obj, Mapping):
        return [f"a manifest is a mapping, got {type(obj).__name__}"]
    problems = list(_structure(obj))
    if _PEM.search(json.dumps(obj, default=str)):
        problems.append("the manifest embeds PEM text (a certificate or a key): reference a kubernetes.io/tls "
                        "Secret by name instead")
    try:
        back = _sanitize(_deserialize(obj))
    except (ValueError, TypeError, AttributeError) as exc:
        problems.append(f"the kserve SDK rejects the manifest: {_sdk_error(exc)}")
    else:
        problems += [f"SDK round trip: {p}" for p in _diff(dict(obj), back, "")]
    return problems


# --------------------------------------------------------------------------- the example


def example_card() -> ModelCard:
    """The sample card behind ``infra/k8s/credit-v1.yaml`` (not a registered model).

    ``credit@1`` on ``customers`` at ε = 3.0, approved by carla (compliance_officer). Its build
    cost ε = 6.0: a first run failed fairness and the released model is the reweighed retrain.
    """
    first, second = (hashlib.sha256(f"example run {i}".encode()).hexdigest()[:32] for i in (1, 2))
    cost = PrivacyCost(build=hashlib.sha256(b"example build").hexdigest()[:32], epsilon=6.0, delta=2e-5,
                       runs=[LedgerRunCost(run=first, epsilon=3.0, delta=1e-5),
                             LedgerRunCost(run=second, epsilon=3.0, delta=1e-5)], released_run=second)
    at = datetime(2025, 3, 3, 9, 30, tzinfo=timezone.utc)
    metrics = {"disparate_impact": 0.91, "equal_opportunity_diff": 0.04, "predictive_parity_diff": 0.03}
    return ModelCard(
        name="credit",
        version=1,
        dataset="customers",
        purpose="credit_scoring",
        created_at=at,
        created_by="sam",
        features=["customer_profile:income", "customer_profile:region", "customer_profile:age_band"],
        label="defaulted",
        data_versions={"silver.customers": 7},
        privacy=PrivacyGuarantee(epsilon=3.0, delta=1e-5, accountant="prv", target_epsilon=3.0,
                                 noise_multiplier=1.1, max_grad_norm=1.0, epochs=5, sample_rate=0.01, cost=cost),
        utility={"accuracy": 0.81, "auc": 0.86},
        fairness=FairnessReport(
            attributes={"sex": metrics, "ethnicity": {**metrics, "disparate_impact": 0.87}},
            passed=True,
            thresholds={"disparate_impact_min": 0.8, "equal_opportunity_max_diff": 0.1,
                        "predictive_parity_max_diff": 0.1},
        ),
        artifact_sha256={
            "model.pt": hashlib.sha256(b"example weights").hexdigest(),
            "preprocess.json": hashlib.sha256(b"example preprocessing").hexdigest(),
        },
        approvals=[Approval(actor="carla", role="compliance_officer", at=at.replace(day=4))],
        status="approved",
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m serving.manifests [out_dir]``: re-render the example (default ``infra/k8s``)."""
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0]) if args else Path(__file__).resolve().parents[1] / "infra" / "k8s"
    print(write_manifest(example_card(), out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
