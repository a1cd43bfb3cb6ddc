"""Differentially private training of a tabular MLP (DP-SGD, Opacus's privacy analysis).

:func:`train` fits a small MLP (configurable hidden layers, one logit) on numeric features.
The noise multiplier is Opacus's choice for the target (ε, δ) after ``epochs`` passes with
Poisson sampling, and an Opacus accountant (PRV by default, or RDP/GDP) reports the ε
actually spent. Three ways to compute the clipped gradients (``grad_sample_mode``):

* ``fused`` (default): the ghost-norm identity in closed form for this MLP, one forward
  and one backward pass per step (training/fused.py, checked against Opacus's per-sample
  gradients); sample weights (reweighing) enter each sample's loss before clipping;
* ``ghost``: Opacus's ghost clipping (``make_private_with_epsilon``); ``hooks`` is used
  instead when sample weights are given, because ghost takes the loss's reduction;
* ``hooks``: Opacus's default per-sample gradients.

On this 2-core CPU, against a plain step of the same model on the same batches, Opacus's
modes cost 4.5–6.5× and ``fused`` 1.3× (benchmarks/bench_training.py).

The GPU is used when ``torch.cuda.is_available()``; CPU otherwise. The same seed gives the
same model on CPU. ``private=False`` trains the same model without DP (the benchmark's
baseline). Privacy budgets across runs are the ledger's job (governance.ledger): reserve
before calling :func:`train`, commit ``result.epsilon`` after.
"""

from __future__ import annotations

import io
import math
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np


@dataclass(frozen=True, kw_only=True)
class TrainOptions:
    hidden: tuple[int, ...] = (64, 64)
    epochs: int = 5
    batch_size: int | None = 512  # expected batch size; None: auto_batch_size(training rows)
    learning_rate: float = 0.002
    max_grad_norm: float = 1.0
    target_epsilon: float = 3.0
    delta: float = 1e-5
    accountant: Literal["prv", "rdp", "gdp"] = "prv"
    grad_sample_mode: Literal["fused", "ghost", "hooks"] = "fused"
    seed: int = 0
    private: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self) -> None:
        if self.epochs < 1 or (self.batch_size is not None and self.batch_size < 1):
            raise ValueError("epochs and batch_size must be at least 1")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0 (got {self.learning_rate})")
        if self.private and not (self.target_epsilon > 0 and 0 < self.delta < 1):
            raise ValueError(f"target ε must be > 0 and δ in (0, 1) (got {self.target_epsilon}, {self.delta})")
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden layer sizes must be positive (got {self.hidden})")


@dataclass
class TrainResult:
    state_dict: bytes  # torch.save of the model's weights (no data)
    n_features: int
    options: TrainOptions
    epsilon: float | None
    noise_multiplier: float | None
    sample_rate: float
    device: str
    epoch_seconds: list[float] = field(default_factory=list)
    peak_memory_mb: float | None = None
    # Per epoch, with an ``eval_set``: ε spent so far and the holdout's AUC / log loss (the
    # privacy–utility curve of this run; computing it spends no extra privacy).
    curve: list[dict[str, float | None]] = field(default_factory=list)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return predict_proba(self, X)


def _device(opts: TrainOptions) -> str:
    import torch

    if opts.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return opts.device


class _Rows:
    """Tensors indexed a batch at a time (``__getitems__``): DataLoader then skips per-row collation."""

    def __init__(self, *tensors: Any) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, i: int) -> tuple:
        return tuple(t[i] for t in self.tensors)

    def __getitems__(self, idx: list[int]) -> tuple:
        import torch

        i = torch.as_tensor(idx, dtype=torch.long, device=self.tensors[0].device)
        return tuple(t[i] for t in self.tensors)


def _as_batch(batch: tuple) -> tuple:
    return batch  # already stacked by _Rows.__getitems__


def build_model(n_features: int, hidden: tuple[int, ...]):  # noqa: ANN201
    from torch import nn

    layers: list[nn.Module] = []
    prev = n_features
    for h in hidden:
        layers += [nn.Linear(prev, h), nn.ReLU()]
        prev = h
    layers.append(nn.Linear(prev, 1))
    return nn.Sequential(*layers)


AUTO_BATCH_MAX = 512
AUTO_BATCH_MIN = 32


def auto_batch_size(rows: int) -> int:
    """The expected batch size when none is given: a tenth of the training rows, at least 32 and
    at most 512 (never more than the rows). 512 suits the reference data (16,000 training rows:
    32 steps an epoch); on a dataset of a few thousand rows it would leave a handful of steps per
    epoch, each with a large sampling rate, which DP-SGD pays for in noise per useful step. A
    tenth keeps about ten Poisson batches per epoch on small data."""
    return max(1, min(AUTO_BATCH_MAX, max(AUTO_BATCH_MIN, rows // 10), rows))


def resolve_batch_size(opts: TrainOptions, rows: int) -> TrainOptions:
    """``opts`` with a concrete batch size: ``auto_batch_size(rows)`` when it says None."""
    return opts if opts.batch_size is not None else replace(opts, batch_size=auto_batch_size(rows))


def train(X: np.ndarray, y: np.ndarray, opts: TrainOptions, *, sample_weight: np.ndarray | None = None,
          eval_set: tuple[np.ndarray, np.ndarray] | None = None) -> TrainResult:
    """Train on ``X`` (n × d float) and binary ``y``; DP unless ``opts.private`` is False.

    With ``eval_set`` (holdout X, y) each epoch adds a point to ``result.curve``: the ε the
    accountant has spent so far and the holdout's utility at that point.
    """
    import torch

    from training import fused

    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y, dtype=np.float32).reshape(-1)
    if X.ndim != 2 or len(X) != len(y):
        raise ValueError(f"X must be n × d and y length n (got {X.shape} and {y.shape})")
    if len(X) == 0:
        raise ValueError("no training rows")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0/1")
    if not np.isfinite(X).all():
        raise ValueError("features contain NaN or infinity: impute them first (silver's preprocessing does)")
    torch.manual_seed(opts.seed)
    np.random.seed(opts.seed)
    device = _device(opts)
    n = len(X)
    opts = resolve_batch_size(opts, n)
    w = None if sample_weight is None else np.asarray(sample_weight, np.float32)
    Xt, yt = torch.from_numpy(X).to(device), torch.from_numpy(y).to(device)
    wt = None if w is None else torch.from_numpy(w).to(device)
    model = build_model(X.shape[1], opts.hidden).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=opts.learning_rate)
    gen = torch.Generator(device=device).manual_seed(opts.seed)
    steps = math.ceil(n / opts.batch_size)  # batches per epoch; Poisson rate 1/steps, as Opacus sets it
    sample_rate = 1.0 / steps
    mode = opts.grad_sample_mode
    if mode == "fused" and not fused.supports(model):
        mode = "ghost"
    if mode == "ghost" and w is not None:
        mode = "hooks"  # Opacus's ghost clipping takes the loss's reduction, not per-sample weights
    engine = accountant = dp = None
    sigma: float | None = None
    criterion = torch.nn.BCEWithLogitsLoss(reduction="none" if w is not None else "mean")
    loader: Any = None
    if opts.private and mode == "fused":
        from opacus.accountants import create_accountant
        from opacus.accountants.utils import get_noise_multiplier

        sigma = get_noise_multiplier(target_epsilon=opts.target_epsilon, target_delta=opts.delta,
                                     sample_rate=sample_rate, epochs=opts.epochs, accountant=opts.accountant)
        accountant = create_accountant(mechanism=opts.accountant)
        dp = fused.FusedDPSGD(model, noise_multiplier=sigma, max_grad_norm=opts.max_grad_norm,
                              expected_batch_size=sample_rate * n, generator=gen)
    elif opts.private:
        from opacus import PrivacyEngine
        from torch.utils.data import DataLoader

        ds = _Rows(Xt, yt, wt if wt is not None else torch.ones(n, device=device))
        loader = DataLoader(ds, batch_size=opts.batch_size, shuffle=True, collate_fn=_as_batch,
                            generator=torch.Generator().manual_seed(opts.seed))
        engine = PrivacyEngine(accountant=opts.accountant)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if mode == "ghost":
                model, optimizer, criterion, loader = engine.make_private_with_epsilon(
                    module=model, optimizer=optimizer, data_loader=loader, criterion=criterion,
                    target_epsilon=opts.target_epsilon, target_delta=opts.delta, epochs=opts.epochs,
                    max_grad_norm=opts.max_grad_norm, grad_sample_mode="ghost", poisson_sampling=True,
                )
            else:
                model, optimizer, loader = engine.make_private_with_epsilon(
                    module=model, optimizer=optimizer, data_loader=loader,
                    target_epsilon=opts.target_epsilon, target_delta=opts.delta, epochs=opts.epochs,
                    max_grad_norm=opts.max_grad_norm, poisson_sampling=True,
                )
        sigma = optimizer.noise_multiplier

    def batches():  # noqa: ANN202
        if loader is not None:  # Opacus's Poisson loader
            yield from loader
        elif dp is not None:  # Poisson sampling, one batch per step
            for idx in fused.poisson_epoch(n, sample_rate, steps, gen, device):
                yield Xt[idx], yt[idx], (wt[idx] if wt is not None else None)
        else:  # plain: a shuffled pass in fixed-size batches
            perm = torch.randperm(n, generator=gen, device=device)
            for s in range(0, n, opts.batch_size):
                idx = perm[s:s + opts.batch_size]
                yield Xt[idx], yt[idx], (wt[idx] if wt is not None else None)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    epoch_s = []
    curve: list[dict[str, float | None]] = []

    def spent() -> float | None:
        if accountant is not None:
            return accountant.get_epsilon(opts.delta)
        return engine.get_epsilon(opts.delta) if engine is not None else None

    model.train()
    for epoch in range(opts.epochs):
        t0 = time.perf_counter()
        for xb, yb, wb in batches():
            optimizer.zero_grad(set_to_none=True)
            if dp is not None:  # an empty Poisson batch still takes its noisy step
                dp.backward(xb, yb, wb)
                optimizer.step()
                accountant.step(noise_multiplier=sigma, sample_rate=sample_rate)
                continue
            if len(xb) == 0:  # Opacus's loader can draw an empty batch
                continue
            loss = criterion(model(xb).squeeze(-1), yb)
            if wb is not None and w is not None:
                loss = (loss * wb).mean()
            loss.backward()
            optimizer.step()
        epoch_s.append(time.perf_counter() - t0)
        if eval_set is not None:
            curve.append({"epoch": epoch + 1, "epsilon": spent(), **_holdout_utility(model, eval_set, device)})
            model.train()
    eps = spent()
    base = model._module if hasattr(model, "_module") else model
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in base.state_dict().items()}, buf)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    return TrainResult(
        state_dict=buf.getvalue(), n_features=X.shape[1], options=opts, epsilon=eps,
        noise_multiplier=sigma if opts.private else None,
        sample_rate=sample_rate if opts.private else min(1.0, opts.batch_size / n), device=device, epoch_seconds=epoch_s, peak_memory_mb=peak,
        curve=curve,
    )


def _holdout_utility(model: Any, eval_set: tuple[np.ndarray, np.ndarray], device: str) -> dict[str, float | None]:
    """AUC and log loss of the model in its current state on a holdout (no gradients, no privacy cost)."""
    import torch
    from sklearn.metrics import log_loss, roc_auc_score

    Xv, yv = np.asarray(eval_set[0], np.float32), np.asarray(eval_set[1], np.float32).reshape(-1)
    model.eval()
    with torch.no_grad():
        p = torch.sigmoid(model(torch.from_numpy(Xv).to(device)).squeeze(-1)).cpu().numpy()
    auc = float(roc_auc_score(yv, p)) if len(np.unique(yv)) == 2 else None
    return {"auc": auc, "log_loss": float(log_loss(yv, np.clip(p, 1e-7, 1 - 1e-7), labels=[0, 1]))}


def load_model(result_or_bytes: TrainResult | bytes, n_features: int | None = None, hidden: tuple[int, ...] | None = None):  # noqa: ANN201
    import torch

    if isinstance(result_or_bytes, TrainResult):
        blob, n_features, hidden = result_or_bytes.state_dict, result_or_bytes.n_features, result_or_bytes.options.hidden
    else:
        blob = result_or_bytes
    model = build_model(int(n_features), tuple(hidden or ()))
    model.load_state_dict(torch.load(io.BytesIO(blob), weights_only=True))
    model.eval()
    return model


def predict_proba(result: TrainResult | bytes, X: np.ndarray, *, n_features: int | None = None,
                  hidden: tuple[int, ...] | None = None) -> np.ndarray:
    """Scores of a trained model: a :class:`TrainResult`, or saved weights with their shape."""
    import torch

    model = load_model(result, n_features, hidden)
    with torch.no_grad():
        return torch.sigmoid(model(torch.from_numpy(np.asarray(X, np.float32))).squeeze(-1)).numpy()


__all__ = ["TrainOptions", "TrainResult", "train", "train_distributed", "train_on_ray", "predict_proba", "load_model",
           "build_model"]


# -- data-parallel training across processes ------------------------------------------------
def _worker(rank: int, world: int, port: int, X: np.ndarray, y: np.ndarray, opts: TrainOptions, out: Any) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        res = _dp_loop(rank, X, y, opts)
        if res is not None:
            out.put(res)
    finally:
        dist.destroy_process_group()


def _dp_loop(rank: int, X: np.ndarray, y: np.ndarray, opts: TrainOptions) -> dict[str, Any] | None:
    """One process's part of data-parallel DP-SGD, in a process group already set up (by
    :func:`train_distributed`, or by Ray Train for :func:`train_on_ray`): Opacus's DPDDP with its
    distributed Poisson sampler, noise added once per step (by rank 0) to the all-reduced sum of
    clipped gradients, accounted once. Rank 0 returns the model and the ε; the others None."""
    import torch
    from opacus import PrivacyEngine
    from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(opts.seed)
    model = DPDDP(build_model(X.shape[1], opts.hidden))
    optimizer = torch.optim.Adam(model.parameters(), lr=opts.learning_rate)
    ds = TensorDataset(torch.from_numpy(X), torch.from_numpy(y))
    loader = DataLoader(ds, batch_size=opts.batch_size)
    engine = PrivacyEngine(accountant=opts.accountant)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, optimizer, loader = engine.make_private_with_epsilon(
            module=model, optimizer=optimizer, data_loader=loader, target_epsilon=opts.target_epsilon,
            target_delta=opts.delta, epochs=opts.epochs, max_grad_norm=opts.max_grad_norm, poisson_sampling=True,
        )
    criterion = torch.nn.BCEWithLogitsLoss()
    epoch_s = []
    for _ in range(opts.epochs):
        t0 = time.perf_counter()
        for xb, yb in loader:
            if len(xb) == 0:
                continue
            optimizer.zero_grad()
            loss = criterion(model(xb).squeeze(-1), yb)
            loss.backward()
            optimizer.step()
        epoch_s.append(time.perf_counter() - t0)
    if rank != 0:
        return None
    base = model._module.module if hasattr(model, "_module") else model.module
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in base.state_dict().items()}, buf)
    return {"state": buf.getvalue(), "epsilon": engine.get_epsilon(opts.delta), "noise": optimizer.noise_multiplier,
            "epoch_s": epoch_s}


def _from_loop(res: dict[str, Any], X: np.ndarray, opts: TrainOptions) -> TrainResult:
    """The :class:`TrainResult` of rank 0's :func:`_dp_loop` result."""
    return TrainResult(state_dict=res["state"], n_features=X.shape[1], options=opts, epsilon=res["epsilon"],
                       noise_multiplier=res["noise"], sample_rate=min(1.0, opts.batch_size / len(X)), device="cpu",
                       epoch_seconds=res["epoch_s"])


def train_distributed(X: np.ndarray, y: np.ndarray, opts: TrainOptions, *, world_size: int = 2) -> TrainResult:
    """DP-SGD across ``world_size`` processes (torch.distributed, gloo on CPU) with Opacus's DPDDP.

    Every process holds the data; Opacus's distributed Poisson sampler gives each its share of
    each logical batch and the noise is added once per step, so the run is accounted once
    (the ε of rank 0) — which is what the privacy ledger records.
    """
    import socket

    import torch.multiprocessing as tmp

    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y, dtype=np.float32).reshape(-1)
    if not opts.private:
        raise ValueError("train_distributed is for private runs; use train(private=False) for the baseline")
    opts = resolve_batch_size(opts, len(X))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = tmp.get_context("spawn")
    out = ctx.SimpleQueue()
    tmp.start_processes(_worker, args=(world_size, port, X, y, opts, out), nprocs=world_size, join=True,
                        start_method="spawn")
    return _from_loop(out.get(), X, opts)


# -- data-parallel training on a Ray cluster ---------------------------------------------------
def _ray_loop(config: dict[str, Any]) -> None:
    """Ray Train's loop on each worker: the features open from their sealed blob (the key from
    the key store, on this worker's machine), then :func:`_dp_loop`; rank 0 hands the model back
    to the driver's collector, sealed too."""
    import ray.train

    from governance.cluster import TRANSIT_KEY, Transit
    from governance.workspace import Workspace

    ws = Workspace(config["config"])
    try:
        transit = Transit(ws.keyring.system_key(TRANSIT_KEY), config["run_id"])
        X, y = transit.open(config["data"], "train", "features")
        rank = ray.train.get_context().get_world_rank()
        res = _dp_loop(rank, X, y, config["opts"])
        if res is not None:
            import ray as _ray

            _ray.get(config["collector"].put.remote(transit.seal(res, "train", "model")))
    finally:
        ws.close()


class _Collector:
    def __init__(self) -> None:
        self.value: bytes | None = None

    def put(self, value: bytes) -> None:
        self.value = value

    def get(self) -> bytes | None:
        return self.value


def train_on_ray(ws: Any, X: np.ndarray, y: np.ndarray, opts: TrainOptions, *, workers: int = 2) -> TrainResult:
    """DP-SGD data-parallel over ``workers`` Ray Train workers (``TorchTrainer``, gloo on CPU, NCCL
    when the workers have GPUs), on the cluster at ``$RAY_ADDRESS``.

    The same loop as :func:`train_distributed` (Opacus's DPDDP): each worker samples its share of
    every Poisson batch with the global rate q, the clipped sums are all-reduced and the noise
    N(0, σ²C²) is added once, so one accountant holds the run and ε is the single-process run's
    for the same q, σ and steps (tested). The features cross Ray sealed (see
    :class:`governance.cluster.Transit`); Ray Train's run folder (metrics only; no checkpoint
    is written) is a temporary folder, removed after.
    """
    import shutil
    import tempfile
    import uuid

    from governance.cluster import TRANSIT_KEY, Transit, connect

    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y, dtype=np.float32).reshape(-1)
    if not opts.private:
        raise ValueError("train_on_ray is for private runs; use train(private=False) for the baseline")
    if workers < 1:
        raise ValueError(f"workers must be at least 1 (got {workers})")
    opts = resolve_batch_size(opts, len(X))
    ray = connect()
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    run_id = uuid.uuid4().hex
    transit = Transit(ws.keyring.system_key(TRANSIT_KEY), run_id)
    collector = ray.remote(num_cpus=0)(_Collector).remote()
    storage = tempfile.mkdtemp(prefix="lakewarden-ray-train-")
    try:
        trainer = TorchTrainer(
            _ray_loop,
            train_loop_config={"config": ws.config, "run_id": run_id, "opts": opts, "collector": collector,
                               "data": transit.seal((X, y), "train", "features")},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=_device(opts) == "cuda"),
            run_config=RunConfig(storage_path=storage, name=f"lakewarden-{run_id[:8]}"),
        )
        trainer.fit()
        sealed = ray.get(collector.get.remote())
    finally:
        ray.kill(collector)
        shutil.rmtree(storage, ignore_errors=True)
    if sealed is None:
        raise RuntimeError("the Ray Train run ended without a model from rank 0")
    return _from_loop(transit.open(sealed, "train", "model"), X, opts)
