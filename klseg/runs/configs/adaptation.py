"""The config of ``klseg adapt`` (adaptation without target labels).

Standard library only, like the other configs: the choices and defaults come
from :mod:`klseg.registry` (``ADAPT_METHODS``, ``ADAPT_DEFAULTS``, ...).
"""

import dataclasses

from klseg.registry import (
    ADAPT_DEFAULTS,
    ADAPT_LEARNING_RATE,
    ADAPT_METHODS,
    ADAPT_RECIPES,
    MIX_MODES,
    REFERENCE_STYLES,
    STUDENT_BN,
    STYLES,
    TEMPERATURE_RANGE,
)
from klseg.runs.checks import (
    check_choice,
    check_flag,
    check_model_source,
    check_number,
    check_path,
    fail,
)
from klseg.runs.configs.bounds import check_bounded, check_bounded_number
from klseg.runs.configs.training import RunOptions

__all__ = ["AdaptConfig"]


@dataclasses.dataclass
class AdaptConfig(RunOptions):
    """``klseg adapt``: adapt a trained model to a target domain from
    unlabelled target images (docs/adapt.md).

    Args:
        source: the trained model (``.keras`` file or ``keras-hub:`` spec).
        target_images: unlabelled target-domain images (a folder or a data
            set spec; masks, if any, are not read).
        method: ``"self-training"`` (EMA teacher's pseudo-labels and the KL
            term to the source model), ``"bn-stats"`` (AdaBN) or ``"tent"``.
        source_data: labelled source-domain data; with it self-training is
            unsupervised domain adaptation (source labels, cross-domain
            ClassMix), without it source-free.
        val_data, source_val_data: labelled target / source validation
            data, used only to score (``val_data`` also picks
            ``model.keras``; without it the last epoch is kept).
        kl_weight: weight of the KL term to the frozen source model.
            temperature: its temperature.
        consistency_weight, ema_decay, consistency_threshold,
        consistency_rampup, consistency_mix: the pseudo-label term (as
            ``klseg finetune``'s consistency term).
        balance_weight: class-balance term of source-free self-training.
        freeze_head: freeze the classifier in source-free self-training.
        entropy_weight: weight of TENT's entropy term.
        student_bn: BatchNorm policy of self-training.
        style, style_references: restyle the labelled source images towards
            the target domain (``klseg.data.style``; references default to
            ``target_images``).

    ``kl_weight``, ``ema_decay``, ``consistency_threshold``,
    ``consistency_rampup`` and ``style`` left at None take the value of the
    run's mode (:attr:`mode`) in ``klseg.registry.ADAPT_RECIPES``, the
    values the benchmark chose for it, else ``ADAPT_DEFAULTS``; the config
    then holds the values used (``config.yaml``), and :attr:`applied` says
    which came from the mode.
    """

    source: str | None = None
    target_images: str | None = None
    method: str = ADAPT_DEFAULTS["method"]
    source_data: str | None = None
    val_data: str | None = None
    source_val_data: str | None = None
    kl_weight: float | None = None
    temperature: float = ADAPT_DEFAULTS["temperature"]
    consistency_weight: float = ADAPT_DEFAULTS["consistency_weight"]
    ema_decay: float | None = None
    consistency_threshold: float | None = None
    consistency_rampup: int | None = None
    consistency_mix: str = ADAPT_DEFAULTS["consistency_mix"]
    balance_weight: float = ADAPT_DEFAULTS["balance_weight"]
    freeze_head: bool = False
    entropy_weight: float = ADAPT_DEFAULTS["entropy_weight"]
    student_bn: str = ADAPT_DEFAULTS["student_bn"]
    style: str | None = None
    style_references: str | None = None

    def __post_init__(self):
        self._check_run_options()
        if not self.source or not self.target_images:
            fail(
                "adapt needs source and target_images. Received: "
                f"source={self.source!r}, target_images={self.target_images!r}"
            )
        check_model_source("source", self.source)
        check_choice("method", self.method, ADAPT_METHODS)
        self._apply_recipe()
        for name in (
            "target_images",
            "source_data",
            "val_data",
            "source_val_data",
            "style_references",
        ):
            check_path(name, getattr(self, name))
        check_bounded_number("kl_weight", self.kl_weight)
        self.kl_weight = float(self.kl_weight)
        check_number(
            "temperature",
            self.temperature,
            minimum=TEMPERATURE_RANGE[0],
            maximum=TEMPERATURE_RANGE[1],
        )
        self._check_self_training()
        check_bounded_number("entropy_weight", self.entropy_weight)
        check_choice("style", self.style, STYLES)
        self._check_method_options()
        if self.learning_rate is None and self.method in ADAPT_LEARNING_RATE:
            self.learning_rate = ADAPT_LEARNING_RATE[self.method]

    def _check_self_training(self):
        check_bounded_number("consistency_weight", self.consistency_weight)
        check_number("ema_decay", self.ema_decay, minimum=0, maximum=1)
        if self.ema_decay == 1:
            fail(
                "ema_decay must be below 1 (at 1 the teacher never moves from "
                "the source model). Received: ema_decay=1"
            )
        check_number(
            "consistency_threshold", self.consistency_threshold, minimum=0, maximum=1
        )
        check_bounded("consistency_rampup", self.consistency_rampup)
        check_choice("consistency_mix", self.consistency_mix, MIX_MODES)
        check_bounded_number("balance_weight", self.balance_weight)
        check_flag("freeze_head", self.freeze_head)
        check_choice("student_bn", self.student_bn, STUDENT_BN)

    def _check_method_options(self):
        if self.style != "none" and not self.source_data:
            fail(
                f"style={self.style!r} restyles the labelled source images "
                "(source_data) towards the target domain; give source_data or "
                "drop style. Received: source_data=None"
            )
        if self.style not in REFERENCE_STYLES and self.style_references:
            fail(
                "style_references are the target images that style follows; "
                f"choose {', '.join(REFERENCE_STYLES)}. Received: "
                f"style={self.style!r}"
            )
        if self.method == "bn-stats" and self.resume:
            fail(
                "method='bn-stats' re-estimates the statistics in one pass and "
                "has nothing to resume; run it again with overwrite. "
                "Received: resume=True"
            )
        if self.method != "self-training" and self.source_data:
            fail(
                f"method={self.method!r} adapts on target images alone; "
                "source_data feeds self-training. Received: "
                f"source_data={self.source_data!r}"
            )
        if self.method == "tent" and self.student_bn == "frozen":
            fail(
                "method='tent' normalises with each batch's statistics; "
                "student_bn must be 'trainable' or 'synchronized'. "
                "Received: student_bn='frozen'"
            )
        if self.source_data and (self.balance_weight > 0 or self.freeze_head):
            fail(
                "balance_weight and freeze_head guard source-free self-training; "
                "with source_data the source labels do. Received: "
                f"balance_weight={self.balance_weight:g}, "
                f"freeze_head={self.freeze_head}"
            )

    def _apply_recipe(self):
        """Fill the options left unset with the mode's values (recorded in
        config.yaml as the values used)."""
        self.applied = {}
        for key, value in ADAPT_RECIPES.get(self.mode, {}).items():
            if getattr(self, key) is None:
                setattr(self, key, value)
                self.applied[key] = value
        for key in (
            "kl_weight",
            "ema_decay",
            "consistency_threshold",
            "consistency_rampup",
            "style",
        ):
            if getattr(self, key) is None:
                setattr(self, key, ADAPT_DEFAULTS[key])

    @property
    def mode(self):
        """``"unsupervised"`` (self-training with source_data),
        ``"source-free"``, ``"tent"`` or ``"bn-stats"``."""
        if self.method != "self-training":
            return self.method
        return "source-free" if not self.source_data else "unsupervised"

    @property
    def source_free(self):
        return not self.source_data
