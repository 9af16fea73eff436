"""The search's pictures tell the truth: every trial drawn and told apart, importances only
from enough complete trials (and a picture that says so before), no cut axis names."""

from __future__ import annotations

import matplotlib.colors as mcolors
import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from fashion_exp.sweeps import optuna_study

SPACE = {"optimizer.lr": FloatDistribution(1e-4, 1e-1, log=True),
         "model.hidden": CategoricalDistribution(["[2048,1024]", "[512,256]"]),
         "optimizer": CategoricalDistribution(["adam", "sgd"]),
         "trainer.label_smoothing": CategoricalDistribution([0.0, 0.1])}


def study_of(complete: int, pruned_at_1: int) -> optuna.Study:
    """A study with `complete` trials of 3 epochs and `pruned_at_1` trials pruned at epoch 1."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(0))
    for i in range(complete + pruned_at_1):
        trial = study.ask(SPACE)
        if i >= complete:
            trial.report(0.55 + 0.01 * i, 1)
            study.tell(trial, state=TrialState.PRUNED)
            continue
        for epoch in (1, 2, 3):
            trial.report(0.6 + 0.02 * i + 0.05 * epoch, epoch)
        study.tell(trial, 0.6 + 0.02 * i + 0.15)
    return study


def test_every_trial_is_drawn_in_its_own_colour_pruned_ones_as_points() -> None:
    curves = optuna_study.figures(study_of(3, 3))["intermediate_values.png"].axes[0]
    lines = [line for line in curves.get_lines() if line.get_label().startswith("trial ")]
    assert [line.get_label() for line in lines] == [
        "trial 0", "trial 1", "trial 2", "trial 3 (pruned)", "trial 4 (pruned)",
        "trial 5 (pruned)"]
    pruned = lines[3:]
    assert all(len(line.get_xdata()) == 1 and line.get_marker() == "o" for line in pruned)
    low, high = curves.get_ylim()
    assert all(low <= line.get_ydata()[0] <= high for line in pruned)  # inside the axes
    colours = {mcolors.to_hex(line.get_color()) for line in lines}
    assert len(colours) == len(lines)


def distance(x: tuple[float, ...], y: tuple[float, ...]) -> float:
    return sum((a - b) ** 2 for a, b in zip(x, y, strict=True)) ** 0.5


def test_trial_colours_are_far_apart() -> None:
    ten = [mcolors.to_rgb(c) for c in optuna_study.trial_colours(10)]
    assert min(distance(x, y) for i, x in enumerate(ten) for y in ten[i + 1:]) > 0.25
    twenty = [mcolors.to_rgb(c) for c in optuna_study.trial_colours(20)]
    # neighbours differ in hue (Optuna's tab20 order gave trials 0 and 1 two blues)
    assert min(distance(twenty[i], twenty[i + 1]) for i in range(19)) > 0.2
    assert min(distance(twenty[i], twenty[i + 10]) for i in range(10)) > 0.25
    curves = optuna_study.figures(study_of(12, 0))["intermediate_values.png"].axes[0]
    markers = [line.get_marker() for line in curves.get_lines()
               if line.get_label().startswith("trial ")]
    assert markers == ["o"] * 10 + ["s"] * 2  # the light shades also differ in shape


def test_importances_wait_for_enough_complete_trials_and_say_why() -> None:
    few = optuna_study.figures(study_of(2, 1))["param_importances.png"]
    text = " ".join(t.get_text() for t in few.axes[0].texts)
    assert f"at least {optuna_study.MIN_IMPORTANCE_TRIALS} complete trials" in text
    assert "this search has 2" in text
    enough = optuna_study.figures(study_of(optuna_study.MIN_IMPORTANCE_TRIALS, 0))
    title = enough["param_importances.png"].axes[0].get_title()
    assert f"from {optuna_study.MIN_IMPORTANCE_TRIALS} complete trials" in title


def test_parallel_coordinates_name_every_axis_in_full_and_leave_room() -> None:
    figure = optuna_study.figures(study_of(4, 2))["parallel_coordinate.png"]
    axes = figure.axes[0]
    names = [t.get_text() for t in axes.get_xticklabels()]
    assert names == ["objective", "hidden", "optimizer", "lr", "label_smoothing"]
    assert not any(name.endswith("...") for name in names)
    assert "4 complete trials" in axes.get_title()
    assert figure.get_size_inches()[0] >= 1.25 * len(names)  # room for each axis' labels
