"""A fine-tuning sweep over several KL weights: one run folder per weight.

``OUTPUT/`` is a klseg sweep folder (its own marker) holding ``kl_W/`` run
folders, ``metrics.json``, ``report.md`` and ``tradeoff.png``. With
``resume`` the finished weights are kept and the interrupted one continues.
"""

import dataclasses
import json
import time
from pathlib import Path

from klseg.files import write_json
from klseg.runs.config import RESUMABLE_CHANGES
from klseg.runs.finetune import finetune_run, input_paths
from klseg.runs.fit import say
from klseg.runs.folder import RunFolder, check_inputs_not_outputs, open_run
from klseg.runs.results import RunResult, SweepResult, pct

__all__ = ["finished_run", "sweep"]


def _weight_folder(weight):
    return f"kl_{weight:g}"


def sweep(cfg, strategy, is_chief, callbacks):
    """Fine-tune once per KL weight into ``OUTPUT/kl_W/``; see the module."""
    from klseg import report

    started = time.time()
    check_inputs_not_outputs({"output": cfg.output}, input_paths(cfg))
    top = None
    if is_chief:
        top, _ = open_run(
            cfg,
            kind="sweep",
            ignore=RESUMABLE_CHANGES,
            say=lambda message: say(cfg.verbose, message),
            abandoned=_abandoned_sweep,
        )
    results, baseline = {}, None
    for weight in cfg.kl_weight:
        sub = Path(cfg.output) / _weight_folder(weight)
        one = dataclasses.replace(
            cfg,
            kl_weight=(weight,),
            output=str(sub),
            resume=cfg.resume and (sub / "config.yaml").is_file(),
            overwrite=False,
        )
        done = finished_run(sub, cfg.epochs) if cfg.resume else None
        if done is not None:
            say(cfg.verbose, f"kl_weight={weight:g}: finished earlier in {sub}.")
            result = done
        else:
            say(cfg.verbose, f"\n=== kl_weight={weight:g} ({sub}) ===")
            result = finetune_run(one, strategy, is_chief, callbacks, baseline=baseline)
        baseline = result.metrics.get("source_model")
        results[weight] = result
    table = [
        {
            "kl_weight": w,
            "source": (r.metrics.get("source") or {}).get("mean_iou"),
            "target": (r.metrics.get("target") or {}).get("mean_iou"),
        }
        for w, r in results.items()
    ]
    if not is_chief:
        return SweepResult(Path(cfg.output), results, table, None)
    reference = None
    if baseline and "source" in baseline and "target" in baseline:
        reference = {d: baseline[d]["mean_iou"] for d in ("source", "target")}
    plot = None
    if all(row["source"] is not None for row in table):
        plot = report.plot_tradeoff(
            table, top.path / "tradeoff.png", reference=reference
        )
    write_json(
        top.metrics,
        {
            "runs": {_weight_folder(row["kl_weight"]): row for row in table},
            "source_model": baseline,
            "seconds": round(time.time() - started, 1),
        },
    )
    rows = [
        (
            f"[{row['kl_weight']:g}]({_weight_folder(row['kl_weight'])}/report.md)",
            pct(row["source"]),
            pct(row["target"]),
        )
        for row in table
    ]
    if reference:
        rows.insert(
            0, ("source model", pct(reference["source"]), pct(reference["target"]))
        )
    sections = [
        (
            "Source and target mean IoU per KL weight",
            report.markdown_table(["kl_weight", "source mIoU", "target mIoU"], rows),
        ),
    ]
    if plot is None:
        sections.append(
            (
                "Trade-off plot",
                "Not drawn: give --source-val-data to measure the source-domain mIoU.",
            )
        )
    else:
        sections.append(("Trade-off", plot))
    report.write_report(top.report, title="KL-weight sweep", sections=sections)
    return SweepResult(top.path, results, table, plot)


def finished_run(path, epochs):
    """A :class:`RunResult` for a run folder that finished ``epochs``."""
    run = RunFolder(path)
    if not run.metrics.is_file() or not run.model.is_file():
        return None
    latest = run.latest_checkpoint()
    if latest is None or int(latest[1].get("epoch", 0)) < epochs:
        return None
    metrics = json.loads(run.metrics.read_text())
    if metrics.get("epochs") != epochs:
        return None
    return RunResult(run.path, run.model, metrics, metrics.get("best_epoch"), epochs)


def _abandoned_sweep(top):
    """A sweep none of whose runs completed an epoch."""
    if top.metrics.exists():
        return False
    subs = [p for p in top.path.glob("kl_*") if p.is_dir()]
    return all(RunFolder(p).abandoned() for p in subs)
