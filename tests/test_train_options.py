"""`lakewarden train` options: --batch-size (default from the training rows), --learning-rate, --epochs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cli_helpers import lw_in
from governance.errors import LakewardenError
from training.trainer import TrainOptions, auto_batch_size, resolve_batch_size, train

REQUIRED = ["--name", "m", "--features", "customer_profile:income", "--label", "defaulted", "--purpose", "credit_scoring"]


def test_the_default_batch_is_a_tenth_of_the_rows_between_32_and_512():
    assert [auto_batch_size(n) for n in (10, 100, 320, 1000, 5120, 16_000, 1_000_000)] == [10, 32, 32, 100, 512, 512, 512]
    assert resolve_batch_size(TrainOptions(batch_size=None), 1000).batch_size == 100
    assert resolve_batch_size(TrainOptions(batch_size=64), 1000).batch_size == 64
    with pytest.raises(ValueError, match="learning_rate"):
        TrainOptions(learning_rate=0)


def test_train_resolves_an_automatic_batch_size_from_its_rows():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(1000, 3)).astype(np.float32), (rng.random(1000) < 0.3).astype(np.float32)
    res = train(X, y, TrainOptions(batch_size=None, epochs=1, private=False))
    assert res.options.batch_size == 100 and res.sample_rate == pytest.approx(0.1)
    res = train(X, y, TrainOptions(batch_size=None, epochs=1, target_epsilon=3.0, accountant="rdp"))
    assert res.options.batch_size == 100 and res.sample_rate == pytest.approx(0.1)  # ten Poisson batches an epoch


class _Stop(LakewardenError):
    pass


def test_the_cli_passes_batch_size_learning_rate_and_epochs(project: Path, monkeypatch: pytest.MonkeyPatch):
    import training.flow
    from lakewarden.cli import main

    seen: list[TrainOptions] = []

    def fake(ws, actor, **kw):  # noqa: ANN001, ANN003, ANN202
        seen.append(kw["options"])
        raise _Stop("stopped before training")

    monkeypatch.setattr(training.flow, "train_model", fake)
    monkeypatch.chdir(project)
    for extra, want in (([], (None, 0.002, 5)),
                        (["--batch-size", "64", "--learning-rate", "0.01", "--epochs", "3"], (64, 0.01, 3))):
        with pytest.raises(SystemExit) as e:
            main(["--as", "sam", "train", *REQUIRED, *extra])
        assert e.value.code == 1  # the fake's error: the options had reached train_model
        o = seen[-1]
        assert (o.batch_size, o.learning_rate, o.epochs) == want


@pytest.mark.parametrize("args,words", [
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--learning-rate", "0"], "--learning-rate"),
])
def test_impossible_training_options_are_refused_in_one_line(tmp_path: Path, args: list[str], words: str):
    p = lw_in(tmp_path, "train", *REQUIRED, *args)
    assert p.returncode == 2 and words in p.stderr, p.stderr
