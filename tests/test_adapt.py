"""``klseg adapt``: the three methods end to end, resume, refusals, the
collapse signal (the library's maths: tests/test_adaptation.py)."""

import numpy as np
import pytest
from helpers import (
    SIZE,
    Interrupt,
    assert_same_run,
    history,
    interrupted_then_resumed,
    metrics,
    ok,
    refused,
    weights,
)

from klseg import runs

# 6 target images in batches of 2: three steps an epoch.
BENCH = {"num_train": 6, "num_val": 4, "num_unlabeled": 6, "num_target_train": 2}


def _config(bench, source, out, **changes):
    settings = {
        "source": str(source),
        "target_images": str(bench / "target" / "unlabeled"),
        "output": str(out),
        "image_size": SIZE,
        "epochs": 2,
        "batch_size": 2,
        "verbose": 0,
    }
    return runs.AdaptConfig(**{**settings, **changes})


def _uda(bench, source, out, **changes):
    return _config(
        bench,
        source,
        out,
        source_data=str(bench / "source" / "train"),
        val_data=str(bench / "target" / "val"),
        source_val_data=str(bench / "source" / "val"),
        **changes,
    )


@pytest.fixture(scope="module")
def uda_run(bench, source, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "uda"
    runs.adapt(_uda(bench, source, out, seed=2))
    return out


def _split(path):
    """Weights of a ``model.weights.h5`` / ``.keras`` model file by kind."""
    found = weights(path)
    bn = {k: v for k, v in found.items() if "_bn" in k}
    return bn, {k: v for k, v in found.items() if k not in bn}


def _model_weights(path):
    import keras

    model = keras.saving.load_model(path, compile=False)
    return {w.path: np.asarray(w) for w in model.weights}


# --------------------------------------------------------------------------
# the command line


def test_help_names_the_methods_and_the_guards():
    text = ok("adapt", "--help").output
    for word in ("self-training", "bn-stats", "tent", "--source-data", "--style"):
        assert word in text
    assert "adapt" in ok("--help").output


def test_unsupervised_adaptation_from_the_command_line(bench, source, tmp_path):
    out = tmp_path / "run"
    result = ok(
        "adapt",
        "--source",
        source,
        "--target-images",
        bench / "target" / "unlabeled",
        "--source-data",
        bench / "source" / "train",
        "--val-data",
        bench / "target" / "val",
        "--source-val-data",
        bench / "source" / "val",
        "--style",
        "histogram",
        "--epochs",
        1,
        "--batch-size",
        2,
        "--output",
        out,
    )
    # The recipe is said once, with every value the run used.
    assert result.output.count("method=self-training, unsupervised") == 1
    assert "kl_weight=1 " in result.output and "style=histogram" in result.output
    # The mode's defaults, named once; the explicit --style is not among them.
    assert (
        "[defaults of the unsupervised mode: kl_weight=1, ema_decay=0.99, "
        "consistency_threshold=0.968, consistency_rampup=100]" in result.output
    )
    saved = (out / "config.yaml").read_text()
    assert "consistency_threshold: 0.968" in saved and "kl_weight: 1.0" in saved
    found = metrics(out / "metrics.json")
    assert found["mode"] == "unsupervised" and found["saved_model"] == "ema_teacher"
    assert found["monitor"] == "val_ema_target_mean_iou"
    assert {"target", "source", "source_model", "forgetting"} <= set(found)
    shares = found["pseudo_labels"]["class_shares"]
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-5)
    assert set(shares) == set(found["pseudo_labels"]["source_model_class_shares"])
    row = history(out / "history.csv")[0]
    for column in ("lost_classes", "pseudo_share_0", "confident_share", "kl_loss"):
        assert column in row
    assert "val_ema_target_mean_iou" in row and "val_source_mean_iou" in row
    report = (out / "report.md").read_text()
    assert "Pseudo-labels" in report and "unsupervised domain adaptation" in report


def test_the_saved_model_is_the_ema_teacher_of_the_best_epoch(uda_run):
    found = metrics(uda_run / "metrics.json")
    rows = history(uda_run / "history.csv")
    scores = [float(r["val_ema_target_mean_iou"]) for r in rows]
    assert found["best_epoch"] == 1 + int(np.argmax(scores))
    assert found["target"]["mean_iou"] == pytest.approx(max(scores), abs=1e-6)


def test_source_free_without_validation_keeps_the_last_epoch(bench, source, tmp_path):
    out = tmp_path / "sf"
    result = runs.adapt(
        _config(bench, source, out, balance_weight=0.5, freeze_head=True)
    )
    found = metrics(out / "metrics.json")
    assert found["mode"] == "source-free" and found["monitor"] == "val_epoch"
    assert result.best_epoch == 2 == found["best_epoch"]
    assert "balance_loss" in history(out / "history.csv")[0]
    assert "target" not in found  # nothing labelled to score
    # The frozen classifier is the source model's.
    adapted, original = _model_weights(out / "model.keras"), _model_weights(source)
    head = [k for k in original if k.endswith("kernel")][-1]
    # (the EMA of a frozen weight is that weight, up to float32 rounding)
    np.testing.assert_allclose(adapted[head], original[head], rtol=1e-5, atol=1e-6)
    other = [k for k in original if k.endswith("kernel")][0]
    assert not np.array_equal(adapted[other], original[other])


def test_tent_changes_only_batchnorm(bench, source, tmp_path):
    out = tmp_path / "tent"
    runs.adapt(
        _config(
            bench, source, out, method="tent", val_data=str(bench / "target" / "val")
        )
    )
    adapted, original = _model_weights(out / "model.keras"), _model_weights(source)
    changed = {k for k in original if not np.array_equal(adapted[k], original[k])}
    assert changed and all("_bn/" in k for k in changed), sorted(changed)
    assert any(k.endswith("gamma") for k in changed)
    assert metrics(out / "metrics.json")["monitor"] == "val_target_mean_iou"


def test_bn_stats_changes_only_the_moving_statistics(bench, source, tmp_path):
    out = tmp_path / "adabn"
    result = ok(
        "adapt",
        "--method",
        "bn-stats",
        "--source",
        source,
        "--target-images",
        bench / "target" / "unlabeled",
        "--val-data",
        bench / "target" / "val",
        "--output",
        out,
    )
    assert "re-estimated on 6 target images" in result.output
    adapted, original = _model_weights(out / "model.keras"), _model_weights(source)
    changed = {k for k in original if not np.array_equal(adapted[k], original[k])}
    assert changed and all("moving_" in k for k in changed), sorted(changed)
    found = metrics(out / "metrics.json")
    assert found["epochs"] == 0 and "target" in found and "source_model" in found


def test_resumed_adaptation_is_the_uninterrupted_run(bench, source, uda_run, tmp_path):
    # Inside the second epoch: the last checkpoint is epoch 1's, and the resumed
    # run replays the batches of epoch 2 from their start (the end-of-epoch
    # case is the same machinery, tested for every job in tests/test_resume.py).
    out = tmp_path / "run"
    interrupted_then_resumed(
        runs.adapt, _uda(bench, source, out, seed=2), Interrupt(epoch=2, step=2)
    )
    assert_same_run(out, uda_run)


# --------------------------------------------------------------------------
# the defaults of each mode


def test_each_mode_takes_its_measured_defaults_and_an_explicit_option_wins(
    tmp_path,
):
    from klseg.registry import ADAPT_DEFAULTS, ADAPT_RECIPES

    def make(**changes):
        return runs.AdaptConfig(
            source="m.keras", target_images="t", output=str(tmp_path / "o"),
            **changes,
        )  # fmt: skip

    unsupervised = make(source_data="s")
    assert unsupervised.mode == "unsupervised"
    for key, value in ADAPT_RECIPES["unsupervised"].items():
        assert getattr(unsupervised, key) == value
    assert unsupervised.applied == ADAPT_RECIPES["unsupervised"]
    free = make()
    assert free.mode == "source-free" and free.ema_decay == 0.97
    assert free.consistency_threshold == 0.9 and free.kl_weight == 1.0
    assert free.style == ADAPT_DEFAULTS["style"]
    tent = make(method="tent")
    assert tent.kl_weight == 0.0 and tent.learning_rate == 1e-3
    explicit = make(source_data="s", consistency_threshold=0.5, kl_weight=0)
    assert explicit.consistency_threshold == 0.5 and explicit.kl_weight == 0.0
    assert "consistency_threshold" not in explicit.applied
    assert "kl_weight" not in explicit.applied
    # config.yaml records the values used, so a resumed run keeps them.
    saved = unsupervised.to_dict()
    assert saved["consistency_threshold"] == 0.968 and saved["kl_weight"] == 1.0


# --------------------------------------------------------------------------
# refusals (exit 2, nothing written)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "bn-stats", "--resume"], "nothing to resume"),
        (["--style", "fda"], "give source_data or drop style"),
        (["--method", "tent", "--source-data", "SRC"], "adapts on target images"),
        (["--source-data", "SRC", "--balance-weight", "1"], "guard source-free"),
        (["--style-references", "SRC"], "choose fda, histogram, pda"),
        (["--ema-decay", "1"], "ema-decay"),
    ],
)
def test_bad_options_are_refused(bench, source, tmp_path, extra, message):
    extra = [str(bench / "source" / "train") if a == "SRC" else a for a in extra]
    out = tmp_path / "run"
    result = refused(
        "adapt",
        "--source",
        source,
        "--target-images",
        bench / "target" / "unlabeled",
        "--output",
        out,
        *extra,
        code=2,
    )
    assert message in result.output
    assert not out.exists()


def test_target_images_are_required(source, tmp_path):
    result = refused("adapt", "--source", source, "--output", tmp_path / "o", code=2)
    assert "--target-images" in result.output


# --------------------------------------------------------------------------
# the collapse signal


class _Model:
    """What CollapseWatch reads of a SelfTrainingModel."""

    def __init__(self, shares, reference):
        self.shares = np.asarray(shares, "float32")
        self.reference_shares = np.asarray(reference, "float32")

    def pseudo_label_shares(self):
        return self.shares

    def lost_classes(self):
        from klseg.adaptation import LOST_FRACTION, LOST_REFERENCE

        ref = self.reference_shares
        return (ref >= LOST_REFERENCE) & (self.shares < LOST_FRACTION * ref)


def test_the_collapse_watch_names_the_lost_classes(capsys):
    from klseg.runs.adapt import CollapseWatch

    watch = CollapseWatch(["sky", "road", "car"])
    watch.set_model(_Model([0.5, 0.5, 0.0], [0.4, 0.4, 0.2]))
    watch.on_epoch_end(2, {})
    out = capsys.readouterr().out
    assert "epoch 3" in out and "car 0.0% (source model 20.0%)" in out
    assert watch.warnings == [{"epoch": 3, "lost_classes": ["car"]}]
    watch.set_model(_Model([0.45, 0.45, 0.1], [0.4, 0.4, 0.2]))
    watch.on_epoch_end(3, {})
    assert capsys.readouterr().out == ""  # half the source share is not lost


def test_a_collapsing_run_warns_and_records_it(bench, source, tmp_path, capsys):
    # The reference the run computes, changed to claim that the source model
    # predicts its rarest class everywhere: the pseudo-labels give that class
    # (deterministically) far less than a tenth of the target pixels.
    from klseg import adaptation

    original = adaptation.SelfTrainingModel.set_reference_shares
    claimed = []

    def claim_the_rarest(self, shares):
        fake = np.zeros(self.num_classes, "float32")
        claimed.append(int(np.argmin(shares)))
        fake[claimed[-1]] = 1.0
        original(self, fake)

    cfg = _config(bench, source, tmp_path / "run", epochs=1, verbose=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            adaptation.SelfTrainingModel, "set_reference_shares", claim_the_rarest
        )
        runs.adapt(cfg)
    out = capsys.readouterr().out
    found = metrics(tmp_path / "run" / "metrics.json")["pseudo_labels"]
    row = history(tmp_path / "run" / "history.csv")[0]
    rarest = claimed[0]
    assert float(row[f"pseudo_share_{rarest}"]) < 0.1
    assert float(row["lost_classes"]) == 1
    name = list(found["class_shares"])[rarest]
    assert found["lost_classes"] == [name]
    assert found["warnings"] == [{"epoch": 1, "lost_classes": [name]}]
    assert f"Warning: epoch 1: the pseudo-labels lost {name}" in out


# --------------------------------------------------------------------------
# --style on klseg train


def test_train_restyles_its_images_towards_the_references(bench, tmp_path):
    from helpers import train_args

    from klseg.data import load_arrays, load_split
    from klseg.data.style import DomainStyle, load_references

    out = tmp_path / "styled"
    refs = bench / "target" / "unlabeled"
    ok(*train_args(bench, out), "--style", "histogram", "--style-references", refs,
       "--epochs", 1, "--batch-size", 4, "--base-filters", 4, "--depth", 2)  # fmt: skip
    saved = (out / "config.yaml").read_text()
    assert "style: histogram" in saved and str(refs) in saved
    # The stream's images are the restyled ones: histogram matching moves the
    # source images' colour histogram towards the target images'.
    from klseg.runs import streams

    cfg = runs.TrainConfig(
        data=str(bench / "source" / "train"), val_data=str(bench / "source" / "val"),
        output=str(tmp_path / "unused"), style="histogram",
        style_references=str(refs), augment="none", batch_size=2, image_size=SIZE,
    )  # fmt: skip
    style = streams.domain_style(cfg, load_split(str(refs), require_masks=False), SIZE)
    assert isinstance(style, DomainStyle) and style.method == "histogram"
    images, _ = load_arrays(load_split(str(bench / "source" / "train")), SIZE)
    target = np.stack(load_references(str(refs), image_size=SIZE)).astype(float)
    styled = style(images, seed=0).astype(float)
    gap = abs(images.mean() - target.mean())
    assert abs(styled.mean() - target.mean()) < 0.5 * gap


def test_train_style_needs_its_references(bench, tmp_path):
    from helpers import train_args

    result = refused(*train_args(bench, tmp_path / "o"), "--style", "fda", code=2)
    assert "style_references go with style fda, histogram or pda" in result.output
