"""Phase 1 (enhancer pre-training) of a study's pre-trained runs, as Markdown for the report's generated block,
so that a pre-training that failed to reproduce its input cannot pass unnoticed.

For each data variant whose runs record the phase-1 verdict (`phase1_psnr` and `phase1_below_min_psnr` in
the last phase-1 row of metrics.jsonl; keys: `urnet_jax.workdir`): one row per run with phase-1 rows (the
kept epoch, the selection split, the kept enhancer's PSNR in dB, MSE and saturated fraction in % on that
split, and whether it ended below the run's `pretrain.min_psnr`), a one-line summary per model variant
(mean ± sample std of the PSNR over seeds, the runs below their threshold), and a bold warning first when
any run is below. Studies whose rows lack the verdict get no section.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from urnet_jax.evaluation.report import MISSING, markdown_table
from urnet_jax.study.results import FinishedRun, column_header, is_number, ordered
from urnet_jax.study.seed_stats import mean_std
from urnet_jax.study.sweep import ABLATION_MODELS


@dataclasses.dataclass(frozen=True)
class Phase1Outcome:
    """A run's phase 1 as its metrics.jsonl records it."""

    run: FinishedRun
    # The row of the kept (best) epoch; {} when no row is marked best.
    kept: Mapping[str, Any]
    # The last phase-1 row's phase1_below_min_psnr; None when that row has no verdict (written before it existed).
    below_min_psnr: bool | None

    def selection_value(self, key: str) -> float | None:
        """The kept epoch's `<selection split>_<key>` (e.g. 'psnr': dB), None when not recorded."""
        value = self.kept.get(f"{self.kept.get('selected_on')}_{key}")
        return float(value) if is_number(value) else None

    @property
    def min_psnr(self) -> float:
        """The run's `pretrain.min_psnr` (dB)."""
        return float(self.run.config["pretrain"]["min_psnr"])


def phase1_outcome(run: FinishedRun) -> Phase1Outcome | None:
    """The run's phase-1 outcome; None when it has no phase-1 row (not pre-trained)."""
    if not run.phase1_rows:
        return None
    kept = next((row for row in reversed(run.phase1_rows) if row.get("best") is True), {})
    last = run.phase1_rows[-1]
    below = last.get("phase1_below_min_psnr")
    has_verdict = is_number(last.get("phase1_psnr")) and isinstance(below, bool)
    return Phase1Outcome(run=run, kept=kept, below_min_psnr=below if has_verdict else None)


def _cell(value: float | None, spec: str) -> str:
    """`value` formatted with `spec`, 'n/a' for None."""
    return MISSING if value is None else format(value, spec)


def _outcome_row(outcome: Phase1Outcome) -> list[str]:
    """model, seed, kept epoch, selection split, PSNR (dB), input PSNR (dB), MSE, saturated (%), below min_psnr."""
    saturated = outcome.kept.get("saturated_fraction")
    below = (MISSING if outcome.below_min_psnr is None
             else f"{'yes' if outcome.below_min_psnr else 'no'} ({outcome.min_psnr:g} dB)")
    return [column_header(outcome.run.model), str(outcome.run.seed), str(outcome.kept.get("epoch", MISSING)),
            str(outcome.kept.get("selected_on", MISSING)), _cell(outcome.selection_value("psnr"), ".2f"),
            _cell(outcome.selection_value("input_psnr"), ".2f"), _cell(outcome.selection_value("mse"), ".4g"),
            _cell(100.0 * saturated if is_number(saturated) else None, ".2f"), below]


def _count(number: int, noun: str) -> str:
    """'1 seed', '2 seeds'."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _model_summary(model: str, outcomes: Sequence[Phase1Outcome]) -> str:
    """'- Net4: PSNR 28.00 ± 4.24 dB over 2 seeds; 1 of 2 runs below their `pretrain.min_psnr`.'"""
    psnrs = [psnr for psnr in (outcome.selection_value("psnr") for outcome in outcomes) if psnr is not None]
    verdicts = [outcome.below_min_psnr for outcome in outcomes if outcome.below_min_psnr is not None]
    unrecorded = len(outcomes) - len(verdicts)
    return (f"- {column_header(model)}: PSNR {mean_std(psnrs)} dB over {_count(len(psnrs), 'seed')}; {sum(verdicts)} "
            f"of {_count(len(verdicts), 'run')} below {'its' if len(verdicts) == 1 else 'their'} `pretrain.min_psnr`"
            + (f" ({unrecorded} without a recorded verdict)" if unrecorded else "") + ".")


def phase1_section(name: str, variant: str, runs: Sequence[FinishedRun]) -> list[str]:
    """The Markdown parts (heading, warning, table, note, summaries) of one data variant's phase 1, for
    `results/<name>`; [] when no run of `runs` records the phase-1 verdict."""
    outcomes = [outcome for outcome in map(phase1_outcome, runs) if outcome is not None]
    if all(outcome.below_min_psnr is None for outcome in outcomes):
        return []
    models = ordered([outcome.run.model for outcome in outcomes], ABLATION_MODELS)
    outcomes.sort(key=lambda outcome: (models.index(outcome.run.model), outcome.run.seed))
    parts = [f"#### Phase 1 (enhancer pre-training): `results/{name}`, data variant `{variant}`", ""]
    failed = [outcome for outcome in outcomes if outcome.below_min_psnr]
    if failed:
        parts += [f"**Warning: phase 1 ended below `pretrain.min_psnr` in {len(failed)} of {len(outcomes)} "
                  "pre-trained runs: " + ", ".join(
                      f"`{outcome.run.name}` ({_cell(outcome.selection_value('psnr'), '.2f')} dB < "
                      f"{outcome.min_psnr:g} dB)" for outcome in failed)
                  + "; their phase 2 started from an enhancer that does not reproduce its target.**", ""]
    parts += [markdown_table(["model", "seed", "kept epoch", "selected on", "PSNR (dB)", "input PSNR (dB)", "MSE",
                              "saturated (%)", "below min_psnr"], [_outcome_row(outcome) for outcome in outcomes]),
              "",
              "Each pre-trained run's phase 1 (metrics.jsonl): the epoch whose enhancer was kept (lowest "
              "reconstruction MSE on the selection split), that enhancer's PSNR to its target (mean of per-image "
              "PSNR), the unchanged input's PSNR to the same target (what no enhancement scores; 100 dB when the "
              "target is the input), its MSE and share of output values within 0.01 of 0 or 1 (saturated) on that "
              "split, and whether its PSNR is below the run's `pretrain.min_psnr`; n/a: not in the run's rows. "
              "Per model variant, mean ± sample standard deviation of that PSNR over seeds:", "",
              *(_model_summary(model, [o for o in outcomes if o.run.model == model]) for model in models), ""]
    return parts
