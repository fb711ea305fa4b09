"""``klseg demo``: the method end to end on the built-in two-domain data."""

import functools
import time

from klseg.files import write_json
from klseg.runs import runtime
from klseg.runs.checks import size_pair, size_text
from klseg.runs.configs import ExportConfig, FinetuneConfig, SynthConfig, TrainConfig
from klseg.runs.export import export
from klseg.runs.finetune import finetune_one
from klseg.runs.fit import say
from klseg.runs.folder import OutputFolder, holds_folders
from klseg.runs.inputs import load_model
from klseg.runs.results import DemoResult, pct
from klseg.runs.scoring import predict_classes
from klseg.runs.synth import synth_data
from klseg.runs.train import train

__all__ = ["demo"]


@holds_folders
def demo(cfg):
    """Train a source model, fine-tune it without and with the KL term.

    On the built-in two-domain benchmark (:mod:`klseg.data.synthetic`):

    1. write the data to ``OUTPUT/data``;
    2. train a U-Net on the source domain (``OUTPUT/source``);
    3. fine-tune it on the few labelled target images with ``kl_weight=0``
       (``OUTPUT/finetune-plain``) and with the KL term on unlabelled
       source-domain images (``OUTPUT/finetune-kl``);
    4. write both domains' validation mIoU of the three models to
       ``OUTPUT/metrics.json`` and ``OUTPUT/report.md`` (with plots), and the
       KL model as a SavedModel to ``OUTPUT/export``.

    Returns:
        A :class:`DemoResult`; its ``summary()`` is the printed table.
    """
    started = time.time()
    settings = cfg.settings()
    out = OutputFolder(cfg.output, "demo").claim(replace=cfg.overwrite).path
    write_json(out / "demo.json", {"settings": settings, "seed": cfg.seed})
    step = functools.partial(say, cfg.verbose)
    data_dir = out / "data"
    step(f"[1/5] Writing the two-domain benchmark to {data_dir}")
    _write_data(cfg, settings, data_dir)
    step("[2/5] Training the source model on the source domain")
    source_run = _train_source(cfg, settings, data_dir, out)
    plain, kl = _finetune_both(cfg, settings, data_dir, out, source_run, step)
    step("[5/5] Writing the report and the SavedModel export")
    weight = settings["kl_weight"]
    table = _domain_table(plain, kl, weight)
    export_path = export(
        ExportConfig(model=str(kl.model_path), output=str(out / "export"))
    ).path
    seconds = time.time() - started
    write_json(
        out / "metrics.json",
        {
            "mean_iou": table,
            "forgetting": {
                "plain fine-tuning": plain.metrics.get("forgetting"),
                "KL fine-tuning": kl.metrics.get("forgetting"),
            },
            "settings": settings,
            "seconds": round(seconds, 1),
        },
    )
    _write_demo_report(
        out, table, settings, seconds, [source_run, plain, kl], data_dir, weight
    )
    return DemoResult(out, table, seconds, export_path)


def _write_data(cfg, settings, data_dir):
    synth_data(
        SynthConfig(
            output=str(data_dir),
            # The benchmark is square: its side is the longer one asked for.
            image_size=max(size_pair(settings["image_size"])),
            num_train=settings["num_train"],
            num_val=settings["num_val"],
            num_unlabeled=settings["num_unlabeled"],
            num_target_train=settings["num_target_train"],
            seed=cfg.seed,
        )
    )


def _common(cfg, settings):
    """The settings the source run and both fine-tuning runs share."""
    return {
        "image_size": settings["image_size"],
        "batch_size": settings["batch_size"],
        "augment": "light",
        "seed": cfg.seed,
        "verbose": cfg.verbose,
    }


def _train_source(cfg, settings, data_dir, out):
    return train(
        TrainConfig(
            data=str(data_dir / "source" / "train"),
            val_data=str(data_dir / "source" / "val"),
            output=str(out / "source"),
            model="unet",
            base_filters=settings["base_filters"],
            depth=settings["depth"],
            epochs=settings["source_epochs"],
            learning_rate=settings["source_learning_rate"],
            **_common(cfg, settings),
        )
    )


def _finetune_both(cfg, settings, data_dir, out, source_run, step):
    """Fine-tune without the KL term, then with it; returns both runs."""
    tuning = {
        "source": str(source_run.model_path),
        "data": str(data_dir / "target" / "train"),
        "val_data": str(data_dir / "target" / "val"),
        "source_val_data": str(data_dir / "source" / "val"),
        "epochs": settings["finetune_epochs"],
        "learning_rate": settings["finetune_learning_rate"],
        "temperature": settings["temperature"],
        **{**_common(cfg, settings), "batch_size": settings["finetune_batch_size"]},
    }
    strategy, _ = runtime.make_strategy("default")
    step("[3/5] Fine-tuning on the target domain without the KL term")
    plain = finetune_one(
        FinetuneConfig(output=str(out / "finetune-plain"), kl_weight=(0.0,), **tuning),
        strategy,
        True,
        None,
    )
    weight = settings["kl_weight"]
    step(f"[4/5] Fine-tuning with the KL term (kl_weight={weight:g}, on source images)")
    kl = finetune_one(
        FinetuneConfig(
            output=str(out / "finetune-kl"),
            kl_weight=(weight,),
            kl_inputs="source",
            source_images=str(data_dir / "source" / "unlabeled"),
            **tuning,
        ),
        strategy,
        True,
        None,
        baseline=plain.metrics["source_model"],
    )
    return plain, kl


def _domain_table(plain, kl, weight):
    """Both domains' validation mIoU of the three models."""
    baseline = plain.metrics["source_model"]
    return {
        "source model": {d: baseline[d]["mean_iou"] for d in ("source", "target")},
        "plain fine-tuning": {
            d: plain.metrics[d]["mean_iou"] for d in ("source", "target")
        },
        f"KL fine-tuning (w={weight:g})": {
            d: kl.metrics[d]["mean_iou"] for d in ("source", "target")
        },
    }


def _demo_overlays(out, runs_, data_dir, image_size, weight):
    """Validation images of both domains with each model's predictions."""
    import numpy as np

    from klseg import data, models, report

    labelled = {}
    for domain in ("target", "source"):
        images, masks = data.load_arrays(
            str(data_dir / domain / "val"), image_size, require_masks=True
        )
        labelled[domain] = (images[:2], masks[:2])
    images = np.concatenate([labelled[d][0] for d in labelled])
    masks = np.concatenate([labelled[d][1] for d in labelled])
    titles = ("source model", "plain fine-tuning", f"KL (w={weight:g})")
    predictions = {}
    for title, run in zip(titles, runs_):
        model = load_model(run.model_path)
        predictions[title] = predict_classes(model, images)
    return report.plot_overlays(
        images,
        predictions,
        out / "plots" / "overlays.png",
        masks=masks,
        class_names=models.get_class_names(model),
        title="Rows 1-2: target-domain images; rows 3-4: source-domain images",
    )


def _write_demo_report(out, table, settings, seconds, runs_, data_dir, weight):
    from klseg import report

    rows = [
        (name, pct(row["source"]), pct(row["target"])) for name, row in table.items()
    ]
    text = report.markdown_table(["model", "source val mIoU", "target val mIoU"], rows)
    size = size_text(size_pair(settings["image_size"]))
    text += (
        f"\n\nWall time {seconds / 60:.1f} min. Images {size}; "
        f"{settings['num_train']} labelled source images, "
        f"{settings['num_target_train']} labelled target images, "
        f"{settings['num_unlabeled']} unlabelled source images for the KL term, "
        f"{settings['num_val']} validation images per domain."
    )
    bars = report.plot_domain_miou(table, out / "plots" / "domains.png")
    overlays = _demo_overlays(out, runs_, data_dir, settings["image_size"], weight)
    links = "\n".join(f"- [{r.output.name}]({r.output.name}/report.md)" for r in runs_)
    report.write_report(
        out / "report.md",
        title="klseg demo: fine-tuning with and without the KL term",
        sections=[
            ("Validation mean IoU per domain", text),
            ("Before and after", bars),
            ("Predictions", overlays),
            ("Runs", links),
            ("SavedModel", "`export/` (serve with `tf.saved_model.load`)."),
        ],
    )
