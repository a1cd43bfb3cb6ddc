"""Model artifacts in the bucket (issue #17): with ``storage.root: s3://...`` the registry keeps each
version's files under ``<root>/models/<name>/<version>/``, so another machine (a workspace folder
of its own, the same root, KEK and key store) lists, verifies, serves and erases with them.

One model is trained once for the module on a lake in the bucket (the local versitygw of the
session); the other tests register small byte artifacts, which is all they need. Subject values
come from a generated file at run time; none is in this file.
"""

from __future__ import annotations

import csv
import hashlib
import multiprocessing as mp
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from governance.keys import generate_kek_b64

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore")
FEATURES = ["customer_profile:income", "customer_profile:income_log", "customer_profile:region"]
FAIR = {"sex": {"disparate_impact": 0.95, "equal_opportunity_diff": 0.02, "predictive_parity_diff": 0.03},
        "ethnicity": {"disparate_impact": 0.9, "equal_opportunity_diff": 0.04, "predictive_parity_diff": 0.05}}


def _config(root: str, *, keystore: str = ".lakewarden/keys/keystore.db", features: str = "") -> str:
    return ("version: 1\nname: models-s3\n"
            f"storage: {{root: '{root}'}}\n"
            f"keys: {{store: '{keystore}', kek: {{provider: env, var: LAKEWARDEN_KEK}}}}\n"
            f"{features}policies: [policies/*.yaml]\n")


def _policies(folder: Path) -> None:
    shutil.copytree(REPO / "policies", folder / "policies")
    roles = folder / "policies" / "roles.yaml"  # a second approver, for two approvals at once
    roles.write_text(roles.read_text().replace("  carla: [compliance_officer]\n",
                                               "  carla: [compliance_officer]\n  cora: [compliance_officer]\n"))


def machine(first: Path, folder: Path) -> Path:
    """Another machine's project: its own folder (workspace, caches, locks), the first one's storage
    root, key store and feature store (a cluster shares these), the same KEK in its environment."""
    cfg = (first / "lakewarden.yaml").read_text()
    root = cfg.split("root: '", 1)[1].split("'", 1)[0]
    _policies(folder)
    feast = first / ".lakewarden" / "feast"
    (folder / "lakewarden.yaml").write_text(_config(
        root, keystore=str(first / ".lakewarden" / "keys" / "keystore.db"),
        features=f"features: {{registry: '{feast / 'registry.db'}', online: {{path: '{feast / 'online.db'}'}}}}\n"))
    return folder / "lakewarden.yaml"


@pytest.fixture(scope="module")
def bucket(objectstore, tmp_path_factory: pytest.TempPathFactory):
    """A project whose storage root is a prefix of its own in the bucket, its workspace open."""
    from governance.workspace import Workspace

    base = tmp_path_factory.mktemp("models-s3")
    prefix = "m" + uuid.uuid4().hex[:12]
    proj = base / "m1"
    _policies(proj)
    (proj / "lakewarden.yaml").write_text(_config(f"s3://lakewarden/{prefix}"))
    with pytest.MonkeyPatch.context() as mp_:
        for k, v in objectstore.env().items():
            mp_.setenv(k, v)
        kek = generate_kek_b64()
        mp_.setenv("LAKEWARDEN_KEK", kek)
        mp_.delenv("LAKEWARDEN_CONFIG", raising=False)
        mp_.delenv("LAKEWARDEN_USER", raising=False)
        ws = Workspace.open(proj / "lakewarden.yaml")
        yield {"ws": ws, "proj": proj, "prefix": prefix, "kek": kek, "base": base}
        ws.close()


@pytest.fixture(scope="module")
def lake(bucket, objectstore):
    """The bucket's lake with customers in silver, features materialized and one trained model
    (``credit``, its ref in ``ref``); the generated people (for checks) in ``people``."""
    from features.store import Features
    from lakehouse.catalog import Catalog, TableRef
    from lakehouse.ingest import ingest
    from lakehouse.silver import build_silver
    from lakehouse.synth import generate
    from training.flow import train_model
    from training.trainer import TrainOptions

    ws = bucket["ws"]
    with pytest.MonkeyPatch.context() as mp_:
        for k, v in objectstore.env().items():
            mp_.setenv(k, v)
        mp_.setenv("LAKEWARDEN_KEK", bucket["kek"])
        res = generate(bucket["base"] / "landing", people=300, transactions_per_person=0, seed=21, bias=0.3)
        with open(res.files["customers"], newline="") as fh:
            people = list(csv.DictReader(fh))
        ingest(ws, ws.actor("dana"), "customers", [res.files["customers"]])
        build_silver(ws, ws.actor("dana"), "customers")
        fs = Features(ws)
        fs.apply(ws.actor("pipeline"))
        fs.materialize(ws.actor("pipeline"))
        out = train_model(ws, ws.actor("sam"), name="credit", features=FEATURES, label="defaulted",
                          purpose="credit_scoring", mitigate=False,
                          options=TrainOptions(epochs=1, target_epsilon=2.0, accountant="rdp"))
        ws.audit.flush()
        tokens = Catalog(ws.config).open(TableRef("silver", "customers")).to_pyarrow_table(
            columns=["customer_id"])["customer_id"].to_pylist()
    return {**bucket, "ref": out.ref, "tokens": tokens, "people": people}


@pytest.fixture
def env(bucket, objectstore, monkeypatch: pytest.MonkeyPatch):
    """The bucket's project, with the store's variables and the KEK in this test's environment."""
    for k, v in objectstore.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("LAKEWARDEN_KEK", bucket["kek"])
    return bucket


@pytest.fixture
def trained(lake, env):
    return lake


@pytest.fixture
def second(env, tmp_path: Path):
    """A second machine's workspace on the same lake."""
    from governance.workspace import Workspace

    ws = Workspace.open(machine(env["proj"], tmp_path / "m2"))
    yield ws
    ws.close()


def _bucket(lake: dict[str, Any], rel: str = ""):
    from governance.objectstore import ObjectPrefix

    return ObjectPrefix(f"s3://lakewarden/{lake['prefix']}/models" + (f"/{rel}" if rel else ""))


def _copy(reg, ws, name: str, ref, **privacy: Any):
    """Register the trained model's files again under ``name`` with a card the deploy gate passes."""
    trained = reg.card(ref)
    files = {fn: reg.artifact(ref, fn) for fn in ("model.pt", "encoder.json", "reference.json")}
    return reg.register(ws.actor("sam"), name=name, dataset="customers", files=files, card_fields={
        "purpose": "credit_scoring", "features": FEATURES, "label": "defaulted", "fairness": FAIR,
        "data_versions": dict(trained.data_versions), "preprocessing": dict(trained.preprocessing),
        "privacy": {"epsilon": 3.0, "delta": 1e-5, "accountant": "rdp", **privacy}})


def _small(reg, ws, name: str, weights: bytes):
    return reg.register(ws.actor("sam"), name=name, dataset="customers",
                        files={"model.pt": weights, "preprocess.json": b'{"income": [1.0, 2.0]}'},
                        card_fields={"purpose": "credit_scoring", "features": FEATURES, "label": "defaulted",
                                     "fairness": FAIR, "privacy": {"epsilon": 3.0, "delta": 1e-5, "accountant": "rdp"}})


# -- where the files are ----------------------------------------------------------------------------
def test_the_artifacts_are_objects_in_the_bucket_and_not_on_the_local_disk(trained, objectstore):
    env = trained
    from training.registry import Registry

    ws, ref = env["ws"], env["ref"]
    reg = Registry(ws)
    assert reg.in_bucket and reg.root == f"s3://lakewarden/{env['prefix']}/models"
    assert reg.uri(ref) == f"s3://lakewarden/{env['prefix']}/models/credit/{ref.version}"
    objects = _bucket(env, f"credit/{ref.version}").list()
    card = reg.card(ref)
    sha = hashlib.sha256(card.to_json().encode()).hexdigest()
    assert {"model.pt", "encoder.json", "reference.json", ".claim", f"cards/{sha}.json", f"cards/{sha}.md"} <= set(objects)
    assert not (ws.config.workspace_dir / "models").exists()  # nothing fell back to the workspace folder
    with pytest.raises(Exception, match="kept in the bucket"):
        reg.path(ref)
    # the bytes in the bucket are the registered ones, and hold no plaintext identifier of anyone
    store = _bucket(env)
    blobs = {k: store.get(k) for k in store.list()}
    model_objects = {k: v for k, v in blobs.items() if k.startswith(f"credit/{ref.version}/")}
    for fn, digest in card.artifact_sha256.items():
        assert hashlib.sha256(model_objects[f"credit/{ref.version}/{fn}"]).hexdigest() == digest
    everything = b"\n".join(blobs.values())
    people = [p for p in env["people"] if p["customer_id"] and p["email"]][:100]
    assert people and not any(p["customer_id"].encode() in everything or p["email"].encode() in everything
                              for p in people)


def test_a_card_with_personal_data_is_refused_before_anything_reaches_the_bucket(env):
    from training.registry import Registry

    ws = env["ws"]
    email = f"x{uuid.uuid4().hex[:10]}@example.org"  # made at run time
    with pytest.raises(ValueError, match="looks like personal data"):
        Registry(ws).register(ws.actor("sam"), name="leaky", dataset="customers", files={"model.pt": b"w"},
                              card_fields={"purpose": "credit_scoring", "privacy": {"epsilon": 1.0, "delta": 1e-5,
                                                                                    "accountant": "rdp"},
                                           "mitigation": {"note": f"ask {email}"}})
    assert not _bucket(env).exists("leaky")


def test_an_artifact_given_as_a_file_is_uploaded_once_and_verified(env, tmp_path: Path):
    from training.registry import Registry

    ws = env["ws"]
    weights = tmp_path / "weights.bin"
    weights.write_bytes(uuid.uuid4().bytes * 5000)  # made at run time
    reg = Registry(ws)
    ref = reg.register(ws.actor("sam"), name="from_file", dataset="customers", files={"model.pt": weights},
                       card_fields={"purpose": "credit_scoring", "fairness": FAIR,
                                    "privacy": {"epsilon": 3.0, "delta": 1e-5, "accountant": "rdp"}})
    card = reg.verify(ref)
    assert card.artifact_sha256["model.pt"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert reg.artifact(ref, "model.pt") == weights.read_bytes() == _bucket(env, f"from_file/{ref.version}").get("model.pt")
    with pytest.raises(ValueError, match="reserved"):
        reg.register(ws.actor("sam"), name="from_file", dataset="customers", files={"cards": b"x"},
                     card_fields={"purpose": "credit_scoring", "privacy": {"epsilon": 3.0, "delta": 1e-5,
                                                                           "accountant": "rdp"}})


# -- a second machine ------------------------------------------------------------------------------
def test_a_second_machine_lists_verifies_and_serves_the_same_model(trained, second):
    env = trained
    from serving.model import GovernedPredictor
    from training.erasure import models_trained_on
    from training.registry import Registry

    ws, ref, tokens = env["ws"], env["ref"], env["tokens"][:40]
    one, two = Registry(ws), Registry(second)
    assert [c.ref for c in two.list()] == [c.ref for c in one.list()] and ref in [c.ref for c in two.list()]
    assert two.verify(ref) == one.card(ref)
    cache = second.config.workspace_dir / "cache" / "models" / "credit" / str(ref.version)
    assert (cache / "model.pt").is_file()  # verified into this machine's cache
    X = np.random.default_rng(3).normal(size=(16, one.card(ref).preprocessing["n_features"])).astype(np.float32)
    assert np.array_equal(two.load(ref).predict_proba(X), one.load(ref).predict_proba(X))
    here = GovernedPredictor(ws, ref, ws.actor("mel"), log_requests=False)
    there = GovernedPredictor(second, ref, second.actor("mel"), log_requests=False)
    assert np.array_equal(there.score_tokens(tokens), here.score_tokens(tokens))
    # erasure on the second machine finds the model trained on a subject (no models folder there)
    assert not (second.config.workspace_dir / "models").exists()
    found = models_trained_on(second, [tokens[0]])
    assert [m["model"] for m in found if m["model"] == str(ref)] == [str(ref)]


def test_a_cache_that_differs_from_the_card_is_fetched_again(trained, second):
    env = trained
    from training.registry import Registry

    two = Registry(second)
    ref = env["ref"]
    good = two.load(ref)
    cached = second.config.workspace_dir / "cache" / "models" / "credit" / str(ref.version) / "model.pt"
    cached.write_bytes(b"not the weights")
    X = np.ones((2, good.card.preprocessing["n_features"]), np.float32)
    assert np.array_equal(two.load(ref, verify=False).predict_proba(X), good.predict_proba(X))
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == good.card.artifact_sha256["model.pt"]


# -- versions across machines -----------------------------------------------------------------------
def _registrar(env: dict[str, str], config: str, who: int, n: int, start, out) -> None:
    import os

    os.environ.update(env)
    from governance.objectstore import ObjectPrefix
    from governance.workspace import Workspace
    from training.registry import Registry

    listed, put = ObjectPrefix.folders, ObjectPrefix.put
    refused = []

    def folders(self, rel=""):  # both machines list the claims, then both claim: the same number each round
        out = listed(self, rel)
        start.wait(60)
        return out

    def claim(self, rel, data, *, if_absent=False):
        ok = put(self, rel, data, if_absent=if_absent)
        if if_absent and not ok:
            refused.append(rel)
        return ok

    ObjectPrefix.folders, ObjectPrefix.put = folders, claim
    with Workspace.open(config) as ws:
        reg = Registry(ws)
        reg.list()  # warm: imports and the first table read
        refs = [(str(_small(reg, ws, "race", f"weights-{who}-{i}".encode())), f"weights-{who}-{i}") for i in range(n)]
    out.put((refs, refused))


def test_two_machines_registering_at_once_get_distinct_versions_and_lose_nothing(env, objectstore, tmp_path: Path):
    """Each round both machines list the same claims and try the same number at once: the store's
    refusal (412) sends one of them to the next number."""
    from governance.workspace import Workspace
    from training.registry import Registry

    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(2), ctx.Queue()
    child_env = {**objectstore.env(), "LAKEWARDEN_KEK": env["kek"]}
    configs = [str(machine(env["proj"], tmp_path / f"w{w}")) for w in range(2)]
    procs = [ctx.Process(target=_registrar, args=(child_env, configs[w], w, 3, start, out)) for w in range(2)]
    for p in procs:
        p.start()
    got = [out.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    mine = dict(r for refs, _ in got for r in refs)
    refused = [k for _, ks in got for k in ks]
    assert len(mine) == 6  # six registrations, six distinct versions
    assert len(refused) >= 3 and all(k.endswith("/.claim") for k in refused)  # they did collide, every round
    with Workspace.open(configs[0]) as ws:
        reg = Registry(ws)
        listed = [c.ref for c in reg.list("race")]
        assert [r.version for r in listed] == [1, 2, 3, 4, 5, 6] and sorted(map(str, listed)) == sorted(mine)
        for r in listed:  # every version holds its own registration's weights, intact
            card = reg.verify(r)
            assert card.artifact_sha256["model.pt"] == hashlib.sha256(mine[str(r)].encode()).hexdigest()


def test_a_claimed_version_without_a_row_is_skipped_and_never_listed(env, second):
    """A machine that claimed a number and died (before or after some artifacts) leaves a gap: no
    reader lists it, and the next registration takes the number after it."""
    from training.registry import ModelNotFound, Registry

    ws = env["ws"]
    one = Registry(ws)
    r1 = _small(one, ws, "gappy", b"w1")
    store = _bucket(env, "gappy")
    assert store.put(f"{r1.version + 1}/.claim", b'{"claim": "crashed"}', if_absent=True)
    store.put(f"{r1.version + 1}/model.pt", b"half-written")
    assert not store.put(f"{r1.version + 1}/.claim", b"{}", if_absent=True)  # the store refuses a second claim
    r3 = _small(Registry(second), second, "gappy", b"w3")
    assert r3.version == r1.version + 2
    assert [c.version for c in one.list("gappy")] == [r1.version, r3.version]
    with pytest.raises(ModelNotFound):
        one.card("gappy", r1.version + 1)
    one.verify(r3)


def test_a_registration_whose_row_fails_keeps_its_files_unlisted_and_its_number(env, monkeypatch: pytest.MonkeyPatch):
    """The row is the commit point. A failed (or unanswered) commit may still have landed, so the
    version's objects stay where its row would look; without a row nothing lists them."""
    from training.registry import Registry, RegistryError

    ws = env["ws"]
    reg = Registry(ws)

    def lost(*a: Any, **k: Any) -> None:
        raise RegistryError("the commit's answer was lost")

    monkeypatch.setattr(reg, "_append", lost)
    with pytest.raises(RegistryError, match="answer was lost"):
        _small(reg, ws, "unsure", b"w1")
    monkeypatch.undo()
    assert {".claim", "model.pt", "preprocess.json"} <= set(_bucket(env, "unsure/1").list())
    assert Registry(ws).list("unsure") == []
    assert _small(Registry(ws), ws, "unsure", b"w2").version == 2


def test_two_machines_approving_one_version_at_once_both_count(env, second, monkeypatch: pytest.MonkeyPatch):
    """Card revisions commit on the snapshot they were read from: the approval that loses the race
    re-reads the card (now with the other approval) and commits on top of it; nothing is lost and
    the card still matches its row."""
    from training.registry import Registry

    ws = env["ws"]
    one, two = Registry(ws), Registry(second)
    ref = _small(one, ws, "dual", b"w")
    real = two._files.rewrite
    raced: list[int] = []

    def rewrite(r, data, md, commit):  # machine one approves between machine two's read and commit
        if not raced:
            raced.append(1)
            one.approve(ws.actor("carla"), ref)
        return real(r, data, md, commit)

    monkeypatch.setattr(two._files, "rewrite", rewrite)
    card = two.approve(second.actor("cora"), ref)
    assert raced and sorted(a.actor for a in card.approvals) == ["carla", "cora"]
    assert one.verify(ref) == card == two.card(ref)
    assert len([k for k in _bucket(env, f"dual/{ref.version}/cards").list() if k.endswith(".json")]) == 4  # one orphan


# -- tampering and deployment ----------------------------------------------------------------------
def test_a_tampered_artifact_object_is_refused_by_verify_load_and_serving(trained, second, tmp_path: Path):
    env = trained
    from governance.workspace import Workspace
    from serving.model import GovernedPredictor
    from training.registry import ArtifactTampered, Registry

    ws = env["ws"]
    one = Registry(ws)
    ref = _copy(one, ws, "tampered", env["ref"])
    Registry(second).load(ref)  # a good copy in the second machine's cache
    store = _bucket(env, f"tampered/{ref.version}")
    weights = store.get("model.pt")
    store.put("model.pt", weights[:-1] + bytes([weights[-1] ^ 1]))
    for reg in (one, Registry(second)):
        with pytest.raises(ArtifactTampered, match="model.pt changed"):
            reg.verify(ref)
    with pytest.raises(ArtifactTampered, match="model.pt changed"):
        GovernedPredictor(second, ref, second.actor("mel"), log_requests=False)
    with Workspace.open(machine(env["proj"], tmp_path / "m3")) as third:  # no cache: read from the bucket
        with pytest.raises(ArtifactTampered, match="model.pt changed"):
            Registry(third).load(ref, verify=False)
    store.put("model.pt", weights)
    one.verify(ref)
    store.put("extra.bin", b"x")
    with pytest.raises(ArtifactTampered, match="extra.bin is not part of the registered model"):
        one.verify(ref)
    store.delete("extra.bin")
    sha = hashlib.sha256(one.card(ref).to_json().encode()).hexdigest()
    card_json = store.get(f"cards/{sha}.json")
    store.put(f"cards/{sha}.json", card_json.replace(b'"epsilon": 3.0', b'"epsilon": 0.5'))
    with pytest.raises(ArtifactTampered, match="card.json differs from the registry table"):
        Registry(second).card(ref)


def test_the_rendered_manifest_points_at_the_version_in_the_bucket(trained, second, tmp_path: Path):
    env = trained
    import yaml

    from serving.deploy import deploy
    from serving.manifests import validate
    from training.registry import Registry

    ws = env["ws"]
    one = Registry(ws)
    ref = _copy(one, ws, "shipped", env["ref"])
    Registry(second).approve(second.actor("carla"), ref)  # approved on one machine, deployed from the other
    res = deploy(ws, ws.actor("mel"), ref, target="k8s", out_dir=tmp_path)
    obj = yaml.safe_load(Path(res.manifest).read_text())
    env_vars = {e["name"]: e["value"] for e in obj["spec"]["predictor"]["containers"][0]["env"]}
    assert env_vars["STORAGE_URI"] == f"s3://lakewarden/{env['prefix']}/models/shipped/{ref.version}"
    assert validate(obj) == []
    text = Path(res.manifest).read_text()
    assert "AWS_SECRET_ACCESS_KEY" not in text and env["kek"] not in text
    card = Registry(second).card(ref)
    assert card.status == "deployed" and [d.target for d in card.deployments] == ["k8s"]


def test_a_storage_uri_names_the_version_and_no_credentials():
    """No bucket needed: what render and validate accept as the predictor's STORAGE_URI."""
    pytest.importorskip("kserve")
    from serving.manifests import example_card, render_inference_service, validate

    card = example_card()  # credit@1
    obj = render_inference_service(card, storage_uri="s3://lake/prod/models/credit/1/")
    c = obj["spec"]["predictor"]["containers"][0]
    assert {e["name"]: e["value"] for e in c["env"]}["STORAGE_URI"] == "s3://lake/prod/models/credit/1"
    assert validate(obj) == []
    for bad, msg in (("s3://lake/prod/models/credit/2", "not the folder of credit@1"),
                     ("s3://AKIA:secret@lake/models/credit/1", "no credentials"),
                     ("ftp://lake/models/credit/1", "must be one of pvc://, s3://, gs://")):
        with pytest.raises(ValueError, match=msg):
            render_inference_service(card, storage_uri=bad)
    for e in c["env"]:
        if e["name"] == "STORAGE_URI":
            e["value"] = "s3://AKIA:secret@lake/models/credit/1"
    assert any("no credentials" in p for p in validate(obj))

