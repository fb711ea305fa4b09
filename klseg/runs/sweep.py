"""A fine-tuning sweep over several weights: one run folder per setting.

``OUTPUT/`` is a klseg sweep folder (its own marker) holding one run folder
per setting, ``metrics.json``, ``report.md`` and ``tradeoff.png``. A list
of KL weights gives ``kl_W/``; a list of consistency weights (with one KL
weight) gives ``cons_C/``; both lists give the grid, ``kl_W_cons_C/`` for
every pair (KL weight outer, consistency weight inner). The plot labels its
points the same way (``w=0.1``, ``c=1``, ``w=0.1 c=1``). With ``resume`` the
finished settings are kept and the interrupted one continues.
"""

import dataclasses
import time
from pathlib import Path

from klseg.files import write_json
from klseg.runs.configs import RESUMABLE_CHANGES
from klseg.runs.configs.bounds import weight_text
from klseg.runs.fit import finished_result, say
from klseg.runs.folder import (
    RunFolder,
    check_inputs_not_outputs,
    holds_folders,
    open_run,
)
from klseg.runs.results import SweepResult, pct

__all__ = ["finished_run", "sweep"]


def _settings(cfg):
    """``[(kl_weight, consistency_weight or None), ...]`` of the sweep."""
    kl = cfg.kl_weight or (None,)
    cons = cfg.consistency_weight or (None,)
    return [(w, c) for w in kl for c in cons]


def _varies(cfg):
    """Which lists have several values: ``(kl, consistency)``."""
    return tuple(len(w or ()) > 1 for w in (cfg.kl_weight, cfg.consistency_weight))


def _weight_folder(kl, cons, varies=(True, False)):
    """``kl_W``, ``cons_C`` or ``kl_W_cons_C``; the config refused weights
    that would share a name (``klseg.runs.configs.bounds``)."""
    parts = []
    if varies[0]:
        parts.append(f"kl_{weight_text(kl)}")
    if varies[1]:
        parts.append(f"cons_{weight_text(cons)}")
    return "_".join(parts)


def _label(kl, cons, varies):
    parts = []
    if varies[0]:
        parts.append(f"w={weight_text(kl)}")
    if varies[1]:
        parts.append(f"c={weight_text(cons)}")
    return " ".join(parts)


@holds_folders
def sweep(cfg, strategy, is_chief, callbacks, *, run_one, input_paths):
    """Fine-tune once per setting into ``OUTPUT/kl_W/`` (...); see the module.

    Args:
        cfg: the sweep's ``FinetuneConfig`` (a list of weights).
        strategy, is_chief, callbacks: passed to ``run_one``.
        run_one: ``run_one(cfg, strategy, is_chief, callbacks, baseline=...)``
            fine-tunes one setting and returns its :class:`RunResult`.
        input_paths: ``input_paths(cfg)``, the folders and files the runs
            read (none of them may be the output).

    Returns:
        A :class:`SweepResult`.
    """
    started = time.time()
    check_inputs_not_outputs({"output": cfg.output}, input_paths(cfg))
    top = _open_sweep(cfg) if is_chief else None
    varies = _varies(cfg)

    def run(one, baseline):
        return run_one(one, strategy, is_chief, callbacks, baseline=baseline)

    results, baseline = _run_settings(cfg, varies, run)
    table = _table(results, varies)
    # SweepResult.runs: by KL weight, by consistency weight, or by the pair.
    key = {(True, False): 0, (False, True): 1}.get(varies)
    runs = {
        (kl, cons)[key] if key is not None else (kl, cons): r
        for kl, cons, r in results.values()
    }
    if not is_chief:
        return SweepResult(Path(cfg.output), runs, table, None)
    reference = None
    if baseline and "source" in baseline and "target" in baseline:
        reference = {d: baseline[d]["mean_iou"] for d in ("source", "target")}
    plot = _plot(table, top, reference)
    write_json(
        top.metrics,
        {
            "runs": {row["folder"]: row for row in table},
            "source_model": baseline,
            "seconds": round(time.time() - started, 1),
        },
    )
    _write_report(top, table, reference, plot, varies)
    return SweepResult(top.path, runs, table, plot)


def _open_sweep(cfg):
    """The sweep's own folder (the chief's), claimed or reopened."""
    top, _ = open_run(
        cfg,
        kind="sweep",
        ignore=RESUMABLE_CHANGES,
        say=lambda message: say(cfg.verbose, message),
        abandoned=_abandoned_sweep,
    )
    return top


def _run_settings(cfg, varies, run):
    """Each setting's run, in order; a finished one is kept on resume.

    Returns:
        ``({folder: (kl, cons, result)}, baseline)``: the baseline is the
        source model's scores (measured by the first run, passed to the next).
    """
    results, baseline = {}, None
    for kl, cons in _settings(cfg):
        name = _weight_folder(kl, cons, varies)
        sub = Path(cfg.output) / name
        one = dataclasses.replace(
            cfg,
            kl_weight=None if kl is None else (kl,),
            consistency_weight=None if cons is None else (cons,),
            output=str(sub),
            resume=cfg.resume and (sub / "config.yaml").is_file(),
            overwrite=False,
        )
        what = ", ".join(
            f"{field}={weight_text(w)}"
            for field, w in (("kl_weight", kl), ("consistency_weight", cons))
            if w is not None
        )
        done = finished_run(sub, cfg.epochs) if cfg.resume else None
        if done is not None:
            say(cfg.verbose, f"{what}: finished earlier in {sub}.")
            result = done
        else:
            say(cfg.verbose, f"\n=== {what} ({sub}) ===")
            result = run(one, baseline)
        baseline = result.metrics.get("source_model")
        results[name] = (kl, cons, result)
    return results, baseline


def _table(results, varies):
    """One row per setting: its weights, folder, label and both mIoUs."""
    return [
        {
            "kl_weight": r.metrics.get("kl_weight", kl),
            **({} if cons is None else {"consistency_weight": cons}),
            "folder": name,
            "label": _label(kl, cons, varies),
            "saved_model": r.metrics.get("saved_model", "student"),
            "source": (r.metrics.get("source") or {}).get("mean_iou"),
            "target": (r.metrics.get("target") or {}).get("mean_iou"),
        }
        for name, (kl, cons, r) in results.items()
    ]


def _plot(table, top, reference):
    """The trade-off plot, when every run measured the source domain."""
    from klseg import report

    if not all(row["source"] is not None for row in table):
        return None
    return report.plot_tradeoff(table, top.path / "tradeoff.png", reference=reference)


def _write_report(top, table, reference, plot, varies):
    from klseg import report

    rows = [
        (
            f"[{row['label']}]({row['folder']}/report.md)",
            row["saved_model"].replace("_", " "),
            pct(row["source"]),
            pct(row["target"]),
        )
        for row in table
    ]
    if reference:
        rows.insert(
            0,
            ("source model", "", pct(reference["source"]), pct(reference["target"])),
        )
    sections = [
        (
            "Source and target mean IoU per setting",
            report.markdown_table(
                ["setting", "model.keras", "source mIoU", "target mIoU"], rows
            )
            + "\n\nw: kl_weight, c: consistency_weight; model.keras is the "
            "student, or the EMA teacher when the consistency term is on.",
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
    title = {
        (True, False): "KL-weight sweep",
        (False, True): "Consistency-weight sweep",
    }.get(varies, "KL- and consistency-weight grid")
    report.write_report(top.report, title=title, sections=sections)


def finished_run(path, epochs):
    """A :class:`RunResult` for a run folder that finished ``epochs``."""
    run = RunFolder(path)
    if not run.metrics.is_file() or not run.model.is_file():
        return None
    return finished_result(run, run.latest_checkpoint(), epochs)


def _abandoned_sweep(top):
    """A sweep none of whose runs completed an epoch."""
    if top.metrics.exists():
        return False
    subs = [
        p
        for pattern in ("kl_*", "cons_*")
        for p in top.path.glob(pattern)
        if p.is_dir()
    ]
    return all(RunFolder(p).abandoned() for p in subs)
