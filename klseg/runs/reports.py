"""The run report: ``report.md`` and its plots, section by section.

Every training job writes its report through :class:`RunReport`: its own
sections (results, tables), then the pieces they share, in the job's order:
the training curves of ``history.csv``, predictions overlaid on a few
validation images, confusion matrices; the run's settings (its config as
YAML) always come last. Plots go to the run's ``plots/`` folder.
"""

from klseg.files import yaml_text
from klseg.runs.scoring import predict_classes

__all__ = ["RunReport", "curves_section", "settings_section"]


def curves_section(run):
    """The report section with the history's training curves, or None."""
    from klseg import report

    rows = report.read_history(run.history) if run.history.is_file() else None
    if not rows:
        return None
    return (
        "Training curves",
        report.plot_history(rows, run.plots / "training_curves.png"),
    )


def settings_section(cfg):
    """The "Settings" section: the run's config as YAML."""
    return ("Settings", "```yaml\n" + yaml_text(cfg.to_dict()) + "```")


class RunReport:
    """The sections of a run's ``report.md``, written by :meth:`write`.

    Args:
        run: the :class:`klseg.runs.folder.RunFolder`.
        cfg: the run's config (its settings; the ignored mask value).
        names: the class names of the plots.
    """

    def __init__(self, run, cfg, *, names):
        self.run = run
        self.cfg = cfg
        self.names = names
        self.sections = []

    def add(self, section):
        """Add a ``(heading, body)`` section; None adds nothing."""
        if section is not None:
            self.sections.append(section)

    def add_curves(self):
        """The training curves, when the history has rows."""
        self.add(curves_section(self.run))

    def add_overlays(self, model, batch, *, file, heading, title=None):
        """``model``'s predictions over a batch ``(images, masks)``, drawn
        into ``plots/FILE``."""
        from klseg import report

        images, masks = batch
        path = report.plot_overlays(
            images,
            predict_classes(model, images),
            self.run.plots / file,
            masks=masks,
            class_names=self.names,
            ignore_value=self.cfg.ignore_value,
            title=title,
        )
        self.add((heading, path))

    def add_confusion(self, scores, *, name, heading):
        """The confusion matrix of ``scores``, plotted to
        ``plots/confusion_NAME.png``."""
        from klseg import report

        self.add(
            report.confusion_section(
                scores, self.run.plots / f"confusion_{name}.png", heading=heading
            )
        )

    def write(self, title):
        """Write ``report.md``: the sections, then the settings."""
        from klseg import report

        sections = [*self.sections, settings_section(self.cfg)]
        report.write_report(self.run.report, title=title, sections=sections)
