"""The ``adapt`` command: adaptation without target labels (docs/adapt.md)."""

import click

from klseg.registry import (
    ADAPT_DEFAULTS,
    ADAPT_LEARNING_RATE,
    ADAPT_METHODS,
    ADAPT_RECIPES,
    LIMITS,
    MIX_MODES,
    STUDENT_BN,
    STYLES,
    TEMPERATURE_RANGE,
)

from .options import (
    PATH,
    bounded,
    config_option,
    default_option,
    option_block,
    run_errors,
    run_job,
    run_options,
)
from .types import FiniteFloat

__all__ = ["adapt"]


def _inputs():
    """The model and the data an adaptation run reads."""
    return option_block(
        click.option(
            "--source",
            type=PATH,
            help="Trained model to adapt: a .keras file, or keras-hub:PRESET_OR_DIR.",
        ),
        click.option(
            "--target-images",
            type=PATH,
            help="Unlabelled target-domain images (a folder with images/, or a "
            "data set spec such as cityscapes:PATH); masks are not read.",
        ),
        default_option(
            ADAPT_DEFAULTS,
            "--method",
            type=click.Choice(ADAPT_METHODS),
            help="self-training: EMA teacher's pseudo-labels with the KL term to "
            "the source model; bn-stats: BatchNorm statistics re-estimated on the "
            "target images (AdaBN, seconds); tent: entropy minimisation on the "
            "BatchNorm scales and offsets (TENT).",
        ),
        click.option(
            "--source-data",
            type=PATH,
            help="Labelled source-domain data: self-training becomes unsupervised "
            "domain adaptation (source labels, source pixels pasted onto target "
            "images). Without it, self-training is source-free.",
        ),
        click.option(
            "--val-data",
            type=PATH,
            help="Labelled target-domain validation data, used only to score and "
            "to pick model.keras (without it the last epoch is kept).",
        ),
        click.option(
            "--source-val-data",
            type=PATH,
            help="Labelled source-domain validation data: reports the forgetting.",
        ),
    )


def _mode_default(key):
    """``[default: V for MODE, ...]`` of an option whose default depends on
    the mode (``klseg.registry.ADAPT_RECIPES``)."""
    values = [
        f"{value:g}" if isinstance(value, float) else str(value)
        for value in (recipe.get(key) for recipe in ADAPT_RECIPES.values())
    ]
    parts = [
        f"{value} {mode}"
        for value, (mode, recipe) in zip(values, ADAPT_RECIPES.items())
        if key in recipe
    ]
    return f"  [default: {', '.join(parts)}; docs/adapt.md]"


def _terms():
    """The KL term and the pseudo-labels."""
    rates = ", ".join(f"{r:g} for {m}" for m, r in ADAPT_LEARNING_RATE.items())
    return option_block(
        click.option(
            "--kl-weight",
            type=FiniteFloat(min=0, max=LIMITS["kl_weight"][1]),
            help="Weight of the KL term to the frozen source model (on source "
            "images with --source-data, else on target images); the learning "
            f"rate defaults to {rates}." + _mode_default("kl_weight"),
        ),
        default_option(
            ADAPT_DEFAULTS,
            "--temperature",
            type=FiniteFloat(min=TEMPERATURE_RANGE[0], max=TEMPERATURE_RANGE[1]),
            help="Softmax temperature of the KL term.",
        ),
        default_option(
            ADAPT_DEFAULTS,
            "--consistency-weight",
            type=FiniteFloat(min=0, max=LIMITS["consistency_weight"][1]),
            help="Weight of the pseudo-label term (self-training).",
        ),
        click.option(
            "--ema-decay",
            type=FiniteFloat(min=0, max=1, max_open=True),
            help="Decay of the teacher's moving average of the weights."
            + _mode_default("ema_decay"),
        ),
        click.option(
            "--consistency-threshold",
            type=FiniteFloat(min=0, max=1),
            help="Teacher confidence a pixel needs to count as a pseudo-label."
            + _mode_default("consistency_threshold"),
        ),
        click.option(
            "--consistency-rampup",
            type=bounded("consistency_rampup"),
            help="Optimizer steps of the sigmoid ramp-up of the pseudo-label weight."
            + _mode_default("consistency_rampup"),
        ),
        default_option(
            ADAPT_DEFAULTS,
            "--consistency-mix",
            type=click.Choice(MIX_MODES),
            help="Mixing between target images in source-free self-training "
            "(with --source-data, source pixels are pasted instead).",
        ),
    )


def _guards():
    """Source-free guards, TENT, BatchNorm and style."""
    return option_block(
        default_option(
            ADAPT_DEFAULTS,
            "--balance-weight",
            type=FiniteFloat(min=0, max=LIMITS["balance_weight"][1]),
            help="Source-free: weight of the class-balance term (the predicted "
            "class distribution kept near the source model's).",
        ),
        click.option(
            "--freeze-head/--no-freeze-head",
            default=False,
            show_default=True,
            help="Source-free: freeze the classifier (as SHOT does).",
        ),
        default_option(
            ADAPT_DEFAULTS,
            "--entropy-weight",
            type=FiniteFloat(min=0, max=LIMITS["entropy_weight"][1]),
            help="TENT: weight of the entropy term.",
        ),
        default_option(
            ADAPT_DEFAULTS,
            "--student-bn",
            type=click.Choice(STUDENT_BN),
            help="BatchNorm statistics of the adapted model in self-training.",
        ),
        click.option(
            "--style",
            type=click.Choice(STYLES),
            help="Restyle the --source-data images before augmentation: towards "
            "target images (fda, histogram, pda) or with random colours "
            "(random-colour, domain randomisation)." + _mode_default("style"),
        ),
        click.option(
            "--style-references",
            type=PATH,
            help="Target-domain images that --style fda, histogram or pda follows  "
            "[default: --target-images].",
        ),
    )


@click.command()
@config_option
@_inputs()
@_terms()
@_guards()
@run_options
@click.pass_context
@run_errors
def adapt(ctx, **_):
    """Adapt a trained model to a target domain without target labels.

    Needs the trained model and unlabelled target images; labelled source
    data make it unsupervised domain adaptation, labelled target validation
    data only score it. Writes a run folder as finetune does: model.keras
    (the EMA teacher for self-training), metrics.json with both domains'
    scores and the pseudo-label statistics, report.md.

    \b
    Example (unsupervised domain adaptation):
      klseg adapt --source runs/source/model.keras \\
          --target-images data/target/unlabeled --source-data data/source/train \\
          --val-data data/target/val --source-val-data data/source/val \\
          --output runs/adapt

    \b
    Source-free, and the fast baselines:
      klseg adapt --source runs/source/model.keras \\
          --target-images data/target/unlabeled --output runs/adapt-sf
      klseg adapt --method bn-stats --source runs/source/model.keras \\
          --target-images data/target/unlabeled --output runs/adabn
    """
    run_job(
        ctx,
        "adapt",
        "AdaptConfig",
        "source",
        "target_images",
        "output",
        resumable=True,
    )
