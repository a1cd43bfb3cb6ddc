"""KServe InferenceService manifests: render, validate (structure + SDK round trip), write."""

from __future__ import annotations

import copy
import doctest
import hashlib
import re
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

pytest.importorskip("kserve")

import serving.manifests as manifests  # noqa: E402
from governance.pii import find_pii  # noqa: E402
from serving.manifests import (  # noqa: E402
    Resources,
    example_card,
    inference_service_name,
    render_inference_service,
    to_yaml,
    validate,
    write_manifest,
)
from training.registry import Approval, ModelCard, PrivacyGuarantee  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
AT = datetime(2025, 5, 1, 12, 0, tzinfo=timezone.utc)


def card(name: str = "credit", version: int = 2, *, epsilon: float = 2.5, approver: str = "carla") -> ModelCard:
    """A card with the fields the registry requires, approved by ``approver``."""
    return ModelCard(
        name=name,
        version=version,
        dataset="customers",
        purpose="credit_scoring",
        created_at=AT,
        created_by="sam",
        privacy=PrivacyGuarantee(epsilon=epsilon, delta=1e-5, accountant="prv"),
        approvals=[Approval(actor=approver, role="compliance_officer", at=AT)],
        status="approved",
    )


def container(obj: dict) -> dict:
    return obj["spec"]["predictor"]["containers"][0]


# --------------------------------------------------------------------------- render


def test_rendered_manifest_is_valid_and_shaped_for_kserve():
    obj = render_inference_service(card(), namespace="ml", image="registry.example/lw-predictor:1.2", replicas=(2, 5))
    assert validate(obj) == []
    assert (obj["apiVersion"], obj["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    assert obj["metadata"]["name"] == "credit-v2"
    assert obj["metadata"]["namespace"] == "ml"
    assert obj["metadata"]["annotations"]["serving.kserve.io/enable-prometheus-scraping"] == "true"
    pred = obj["spec"]["predictor"]
    assert (pred["minReplicas"], pred["maxReplicas"]) == (2, 5)
    assert pred["serviceAccountName"] == "lakewarden-predictor"
    assert pred["annotations"] == {"prometheus.kserve.io/path": "/metrics", "prometheus.kserve.io/port": "8080"}
    c = container(obj)
    assert c["name"] == "kserve-container"
    assert c["image"] == "registry.example/lw-predictor:1.2"
    assert c["command"] + c["args"] == ["lakewarden", "serve", "--model", "credit@2"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8080}
    assert c["resources"] == {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "2Gi"}}
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env == {
        "LAKEWARDEN_CONFIG": "/etc/lakewarden/lakewarden.yaml",
        "LAKEWARDEN_MODEL_DIR": "/mnt/models",
        "STORAGE_URI": "pvc://lakewarden-models/credit/2",
    }
    assert c["envFrom"] == [{"secretRef": {"name": "lakewarden-predictor"}}]
    assert c["volumeMounts"] == [{"mountPath": "/etc/lakewarden", "name": "lakewarden-config", "readOnly": True}]
    assert pred["volumes"] == [{"configMap": {"name": "lakewarden-config"}, "name": "lakewarden-config"}]


def test_serialized_with_json_field_names_and_no_nulls():
    text = to_yaml(render_inference_service(card()))
    assert "null" not in text
    for snake in ("api_version", "readiness_probe", "service_account_name", "min_replicas", "http_get"):
        assert snake not in text


def test_labels_and_annotations_carry_the_card_and_no_personal_data():
    obj = render_inference_service(card(epsilon=2.5))
    labels, ann = obj["metadata"]["labels"], obj["metadata"]["annotations"]
    assert labels["lakewarden.io/model"] == "credit"
    assert labels["lakewarden.io/model-version"] == "2"
    assert labels["lakewarden.io/dataset"] == "customers"
    assert labels["lakewarden.io/epsilon"] == "2.5"
    assert labels["lakewarden.io/status"] == "approved"
    assert ann["lakewarden.io/model-ref"] == "credit@2"
    assert ann["lakewarden.io/epsilon"] == "2.5"
    assert ann["lakewarden.io/delta"] == "1e-05"
    assert ann["lakewarden.io/approved-by"] == "carla"
    assert yaml.safe_load(ann["lakewarden.io/approvals"]) == [
        {"actor": "carla", "at": "2025-05-01T12:00:00+00:00", "override": False, "role": "compliance_officer"}
    ]
    c = card()
    assert ann["lakewarden.io/card-sha256"] == hashlib.sha256(c.to_json().encode()).hexdigest()
    assert list(find_pii(to_yaml(obj))) == []
    assert all(isinstance(v, str) for v in [*labels.values(), *ann.values()])


def test_any_epsilon_renders_and_validates():
    """A float's digits are never personal data: ε = 2.993874919966173 (Luhn-valid fraction digits) was refused
    as a card. Every repr a float can take renders, validates and round-trips."""
    import random

    rng = random.Random(5)
    for eps in (2.993874919966173, *(rng.uniform(0.01, 10.0) for _ in range(300))):
        obj = render_inference_service(card(epsilon=eps))
        assert validate(obj) == []
        assert float(obj["metadata"]["labels"]["lakewarden.io/epsilon"]) == eps


def test_override_reason_stays_in_the_card():
    c = card().model_copy(update={"approvals": [Approval(actor="carla", role="compliance_officer", at=AT,
                                                         override_reason="call carla on +44 20 7946 0958")]})
    obj = render_inference_service(c)
    assert "7946" not in to_yaml(obj)
    assert '"override":true' in obj["metadata"]["annotations"]["lakewarden.io/approvals"]


def test_personal_data_in_a_card_value_refuses_the_render():
    with pytest.raises(ValueError, match=r"approved-by'\] would carry something that looks like personal data \(email\)") as e:
        render_inference_service(card(approver="carla@bank.example"))
    assert "carla@bank.example" not in str(e.value)  # the refusal does not repeat it


def test_bad_options_are_caller_mistakes():
    with pytest.raises(ValueError, match="replicas"):
        render_inference_service(card(), replicas=(3, 1))
    with pytest.raises(ValueError, match="replicas"):
        render_inference_service(card(), replicas=(0, 0))
    with pytest.raises(ValueError, match="DNS-1123"):
        render_inference_service(card(), namespace="Lake_Warden")
    with pytest.raises(ValueError, match="image"):
        render_inference_service(card(), image="")
    with pytest.raises(ValueError, match="cpu limit 250m is below its request 500m"):
        Resources(cpu_limit="250m")
    with pytest.raises(ValueError, match="quantities"):
        Resources(memory_request="lots")


def test_resources_option_reaches_the_container():
    obj = render_inference_service(card(), resources=Resources(cpu_request="2", cpu_limit="4", memory_request="4Gi",
                                                               memory_limit="8Gi"))
    assert container(obj)["resources"] == {"requests": {"cpu": "2", "memory": "4Gi"},
                                           "limits": {"cpu": "4", "memory": "8Gi"}}
    assert validate(obj) == []


# --------------------------------------------------------------------------- names


def test_name_from_model_and_version():
    assert inference_service_name("credit", 1) == "credit-v1"
    assert inference_service_name("credit_risk_", 12) == "credit-risk--v12"  # '_' -> '-', one-to-one


def test_long_odd_name_is_cut_to_a_valid_distinct_label():
    long_a = "x__credit_scoring_model_for_retail_customers_in_the_north_region"[:63]
    long_b = long_a[:-1] + "z"
    c = card(long_a, 7)
    obj = render_inference_service(c)
    name = obj["metadata"]["name"]
    assert DNS_LABEL.match(name) and name.endswith("-v7")
    assert len(name) <= 63 - len("-predictor-") - len("lakewarden")  # KServe's host label still fits
    assert name.startswith("x--credit-scoring-model")
    assert validate(obj) == []
    assert inference_service_name(long_b, 7) != name  # the hash keeps shared prefixes apart
    assert inference_service_name(long_a, 7) == name  # and is stable


def test_name_must_be_a_registry_name():
    with pytest.raises(ValueError, match="registry name"):
        inference_service_name("Credit-Model", 1)
    with pytest.raises(ValueError, match="version"):
        inference_service_name("credit", 0)


def test_namespace_too_long_for_any_name():
    with pytest.raises(ValueError, match="leaves no room"):
        inference_service_name("credit", 1, namespace="n" * 45)


# --------------------------------------------------------------------------- validate


def test_broken_manifest_names_each_problem():
    obj = render_inference_service(card())
    bad = copy.deepcopy(obj)
    c = container(bad)
    del c["image"]
    c["resources"]["limits"]["cpu"] = "250m"
    c["resources"]["limits"]["memory"] = "512Mi"
    bad["metadata"]["name"] = "Credit_V2"
    assert validate(bad) == [
        "metadata.name 'Credit_V2' is not a DNS-1123 label "
        "(≤ 63 characters: lowercase a-z, 0-9 and '-', alphanumeric at both ends)",
        "spec.predictor.containers[0].image is missing",
        "spec.predictor.containers[0].resources: limits.cpu 250m is below requests.cpu 500m",
        "spec.predictor.containers[0].resources: limits.memory 512Mi is below requests.memory 1Gi",
    ]


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda o: o.update(apiVersion="serving.kserve.io/v1alpha1"),
         "apiVersion is 'serving.kserve.io/v1alpha1', expected 'serving.kserve.io/v1beta1'"),
        (lambda o: o.update(kind="Deployment"), "kind is 'Deployment', expected 'InferenceService'"),
        (lambda o: o["metadata"].pop("namespace"), "metadata.namespace is missing"),
        (lambda o: o["metadata"].update(name="a" * 64), "is not a DNS-1123 label"),
        (lambda o: o["metadata"].update(name="a" * 50),
         "KServe's predictor host label '" + "a" * 50 + "-predictor-lakewarden' is 71 characters (> 63)"),
        (lambda o: o["spec"].pop("predictor"), "spec.predictor is missing"),
        (lambda o: o["spec"]["predictor"]["containers"].append({"name": "sidecar", "image": "x"}),
         "spec.predictor must have exactly one container, has 2"),
        (lambda o: o["spec"]["predictor"].update(minReplicas=4),
         "spec.predictor.minReplicas 4 is above maxReplicas 3"),
        (lambda o: container(o)["readinessProbe"]["httpGet"].update(path="/healthz"),
         "spec.predictor.containers[0].readinessProbe.httpGet.path is '/healthz', expected '/v2/health/ready'"),
        (lambda o: container(o).pop("livenessProbe"),
         "spec.predictor.containers[0].livenessProbe must be an httpGet probe on /v2/health/live"),
        (lambda o: container(o)["livenessProbe"]["httpGet"].update(port=9000),
         "spec.predictor.containers[0].livenessProbe.httpGet.port 9000 is not the container's port (8080)"),
        (lambda o: container(o)["resources"].pop("limits"),
         "spec.predictor.containers[0].resources must set requests and limits"),
        (lambda o: container(o)["resources"]["requests"].update(cpu="half"),
         "spec.predictor.containers[0].resources.requests.cpu 'half' is not a Kubernetes quantity"),
        (lambda o: o["metadata"]["annotations"].update({"lakewarden.io/epsilon": 3.0}),
         "metadata.annotations['lakewarden.io/epsilon'] must be a string, got float"),
        (lambda o: o["metadata"]["labels"].update({"lakewarden.io/approved-by": "carla, sam"}),
         "metadata.labels['lakewarden.io/approved-by'] = 'carla, sam' is not a valid label value"),
        (lambda o: o["metadata"]["annotations"].update({"note": "ask jane.doe@bank.example"}),
         "metadata.annotations['note'] looks like personal data (email)"),
        (lambda o: o["spec"]["predictor"].pop("serviceAccountName"), "spec.predictor.serviceAccountName is missing"),
    ],
)
def test_each_structural_problem(edit, problem):
    obj = render_inference_service(card())
    edit(obj)
    problems = validate(obj)
    assert any(problem in p for p in problems), problems


def test_sdk_round_trip_finds_unknown_fields_coercions_and_missing_required_fields():
    obj = render_inference_service(card())
    typo = copy.deepcopy(obj)
    container(typo)["readinesProbe"] = container(typo).pop("readinessProbe")
    assert "SDK round trip: spec.predictor.containers[0].readinesProbe: not a field the SDK knows " \
           "(dropped on deserialization)" in validate(typo)

    coerced = copy.deepcopy(obj)
    coerced["spec"]["predictor"]["annotations"]["prometheus.kserve.io/port"] = 8080
    assert "SDK round trip: spec.predictor.annotations.prometheus.kserve.io/port: 8080 reads back as '8080'" \
        in validate(coerced)

    nameless = copy.deepcopy(obj)
    del container(nameless)["name"]
    assert validate(nameless) == ["the kserve SDK rejects the manifest: V1Container.name: Field required"]


def test_not_a_mapping():
    assert validate(["apiVersion"]) == ["a manifest is a mapping, got list"]


# --------------------------------------------------------------------------- YAML and files


def test_yaml_round_trips_and_is_stable():
    obj = render_inference_service(card())
    text = to_yaml(obj)
    assert yaml.safe_load(text) == obj
    assert to_yaml(yaml.safe_load(text)) == text
    assert text.startswith("apiVersion: serving.kserve.io/v1beta1\nkind: InferenceService\n")
    # strings a YAML 1.2 reader (kubectl) would take for numbers stay quoted
    assert "lakewarden.io/delta: '1e-05'" in text
    assert "lakewarden.io/model-version: '2'" in text


def test_write_manifest(tmp_path: Path):
    path = write_manifest(card(), tmp_path / "deploy")
    assert path == tmp_path / "deploy" / "credit-v2.yaml"
    text = path.read_text()
    assert text.startswith("# KServe InferenceService for model credit@2")
    assert validate(yaml.safe_load(text)) == []


def test_write_manifest_refuses_an_invalid_render(tmp_path: Path):
    with pytest.raises(ValueError, match="does not validate: spec.predictor.serviceAccountName is missing"):
        write_manifest(card(), tmp_path, service_account="")
    assert list(tmp_path.iterdir()) == []


def test_short_names_fit_long_namespaces():
    obj = render_inference_service(card("credit_scoring_model", 2), namespace="n" * 40)
    assert len(obj["metadata"]["name"]) == 52 - 40
    assert validate(obj) == []


def test_committed_example_is_current(tmp_path: Path):
    committed = REPO / "infra" / "k8s" / "credit-v1.yaml"
    fresh = write_manifest(example_card(), tmp_path)
    assert committed.read_text() == fresh.read_text(), "regenerate it: python -m serving.manifests"
    obj = yaml.safe_load(committed.read_text())
    assert validate(obj) == []
    meta = obj["metadata"]
    assert meta["labels"]["lakewarden.io/epsilon"] == "3.0"
    assert meta["labels"]["lakewarden.io/dataset"] == "customers"
    assert meta["annotations"]["lakewarden.io/approved-by"] == "carla"
    assert meta["annotations"]["lakewarden.io/epsilon-spent"] == "6.0"  # its build: a failed run and the retrain
    assert list(find_pii(committed.read_text())) == []


def test_annotations_say_what_the_build_cost_or_that_it_is_unknown():
    ann = render_inference_service(card(epsilon=2.5))["metadata"]["annotations"]
    assert ann["lakewarden.io/epsilon-spent"] == ann["lakewarden.io/delta-spent"] == "unknown"  # an older card
    ex = example_card()
    ann = render_inference_service(ex)["metadata"]["annotations"]
    assert float(ann["lakewarden.io/epsilon-spent"]) == ex.privacy.cost.epsilon == 6.0
    assert float(ann["lakewarden.io/delta-spent"]) == ex.privacy.cost.delta
    assert ann["lakewarden.io/epsilon"] == "3.0"


def test_main_writes_the_example(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert manifests.main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "credit-v1.yaml")


def test_docstring_examples_run():
    result = doctest.testmod(manifests)
    assert result.attempted >= 4 and result.failed == 0
