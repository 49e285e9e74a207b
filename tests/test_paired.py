"""The paired statistics of the study (urnet_jax/study/paired.py): the two-level bootstrap against exact
enumeration, McNemar's exact test against scipy and a hand-computed value, Holm's adjustment, the
predictions files, and the comparison table of a results folder."""

from __future__ import annotations

import itertools
import json
import pathlib

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import balanced_accuracy_score

from urnet_jax import errors
from urnet_jax.config import base_config
from urnet_jax.evaluation.metrics import metrics_from_confusion
from urnet_jax.evaluation.split_predictions import predictions_file, read_split_predictions, write_split_predictions
from urnet_jax.study import paired, report

CLASSES = ["granulocyte", "monocyte", "lymphocyte"]


def seed_of(seed: int, true, first, second, num_classes: int = 3) -> paired.PairedSeed:
    return paired.PairedSeed(seed, np.asarray(true), np.asarray(first), np.asarray(second), num_classes)


def test_degenerate_bootstrap_gives_the_same_difference_in_every_replicate():
    """First model always right and second always wrong: every resample of seeds and images gives +1."""
    seeds = [seed_of(s, [0, 1, 2, 0, 1], [0, 1, 2, 0, 1], [1, 2, 0, 1, 2]) for s in (1, 2, 3)]
    result = paired.paired_difference(seeds, replicates=300)
    assert result.seeds == (1, 2, 3)
    for metric in paired.METRICS:
        assert result.estimate[metric] == 1.0 and result.interval[metric] == (1.0, 1.0)
    # Identical predictions: every replicate is exactly 0.
    same = [seed_of(s, [0, 1, 2, 2], [0, 2, 2, 1], [0, 2, 2, 1]) for s in (1, 2)]
    assert np.all(paired.bootstrap_replicates(same, replicates=200) == 0.0)


def exact_distribution(seeds: list[paired.PairedSeed]) -> dict[tuple[float, float], float]:
    """{(accuracy difference, balanced accuracy difference): probability} of one bootstrap replicate, by
    enumerating every draw of seeds and, for each drawn seed, every draw of its images."""
    def differences(seed, draw):
        true, first, second = seed.true[list(draw)], seed.first[list(draw)], seed.second[list(draw)]
        return (np.mean(first == true) - np.mean(second == true),
                balanced_accuracy_score(true, first) - balanced_accuracy_score(true, second))

    per_seed = []
    for seed in seeds:  # each seed's image-resample distribution
        size = len(seed.true)
        outcomes: dict[tuple[float, float], float] = {}
        for draw in itertools.product(range(size), repeat=size):
            key = tuple(np.round(differences(seed, draw), 12))
            outcomes[key] = outcomes.get(key, 0.0) + size ** -size
        per_seed.append(outcomes)
    total: dict[tuple[float, float], float] = {}
    count = len(seeds)
    for chosen in itertools.product(range(count), repeat=count):
        for combination in itertools.product(*(per_seed[i].items() for i in chosen)):
            value = tuple(np.round(np.mean([key for key, _ in combination], axis=0), 12))
            total[value] = total.get(value, 0.0) + count ** -count * np.prod([p for _, p in combination])
    return total


def exact_quantile(distribution: dict[tuple[float, float], float], metric: int, q: float) -> float:
    values = sorted(distribution.items(), key=lambda item: item[0][metric])
    cumulative = 0.0
    for key, probability in values:
        cumulative += probability
        if cumulative >= q:
            return key[metric]
    return values[-1][0][metric]


@pytest.mark.filterwarnings("ignore::UserWarning")  # scikit-learn on resamples that lack a class
def test_bootstrap_matches_exact_enumeration_of_a_small_case():
    """Two seeds of three and four images: the replicates' distribution (both metrics), its mean and its
    2.5% / 97.5% quantiles equal the exact ones found by enumerating every resample."""
    seeds = [seed_of(1, [0, 0, 1], [0, 1, 1], [0, 0, 0], num_classes=2),
             seed_of(2, [0, 1, 1, 0], [0, 1, 0, 1], [1, 1, 0, 0], num_classes=2)]
    distribution = exact_distribution(seeds)
    assert abs(sum(distribution.values()) - 1) < 1e-9
    replicates = paired.bootstrap_replicates(seeds, replicates=20000, rng_seed=3)
    for metric in range(2):
        exact_mean = sum(key[metric] * p for key, p in distribution.items())
        exact_std = np.sqrt(sum((key[metric] - exact_mean) ** 2 * p for key, p in distribution.items()))
        assert abs(replicates[:, metric].mean() - exact_mean) < 4 * exact_std / np.sqrt(len(replicates))
        assert abs(replicates[:, metric].std() - exact_std) < 0.03 * exact_std
    # The most likely outcomes appear about as often as enumeration says.
    observed = {}
    for row in np.round(replicates, 12):
        observed[tuple(row)] = observed.get(tuple(row), 0) + 1
    for key, probability in sorted(distribution.items(), key=lambda item: -item[1])[:5]:
        frequency = observed.get(key, 0) / len(replicates)
        assert abs(frequency - probability) < 4 * np.sqrt(probability * (1 - probability) / len(replicates)), key
    result = paired.paired_difference(seeds, replicates=20000, rng_seed=3)
    for metric_index, metric in enumerate(paired.METRICS):
        assert result.interval[metric] == pytest.approx(
            (exact_quantile(distribution, metric_index, 0.025), exact_quantile(distribution, metric_index, 0.975)))
    # The point estimate: the mean over seeds of each seed's difference on all its images.
    assert result.estimate["accuracy"] == pytest.approx(np.mean([(2 - 2) / 3, (2 - 2) / 4]))
    assert result.estimate["balanced_accuracy"] == pytest.approx(np.mean([
        balanced_accuracy_score([0, 0, 1], [0, 1, 1]) - balanced_accuracy_score([0, 0, 1], [0, 0, 0]),
        balanced_accuracy_score([0, 1, 1, 0], [0, 1, 0, 1]) - balanced_accuracy_score([0, 1, 1, 0], [1, 1, 0, 0])]))


def test_the_interval_covers_a_real_difference_and_is_reproducible():
    rng = np.random.default_rng(0)
    seeds = []
    for s in range(5):
        true = rng.integers(3, size=400)
        first = np.where(rng.random(400) < 0.85, true, (true + 1) % 3)  # 85% right
        second = np.where(rng.random(400) < 0.75, true, (true + 2) % 3)  # 75% right
        seeds.append(seed_of(s, true, first, second))
    result = paired.paired_difference(seeds, replicates=500)
    low, high = result.interval["accuracy"]
    assert 0.03 < low < result.estimate["accuracy"] < high < 0.17
    for metric in paired.METRICS:  # each seed's own difference, in seed order; their mean is the estimate
        assert result.per_seed[metric] == tuple(paired.seed_differences(seed)[metric] for seed in seeds)
        assert np.mean(result.per_seed[metric]) == pytest.approx(result.estimate[metric])
    assert result.per_seed["accuracy"][0] == pytest.approx(np.mean(seeds[0].first == seeds[0].true)
                                                           - np.mean(seeds[0].second == seeds[0].true))
    assert result == paired.paired_difference(seeds, replicates=500)  # fixed bootstrap seed


def test_mcnemar_counts_discordant_images_and_matches_scipy():
    # 10 images only the first gets right, 2 only the second, 5 both, 3 neither.
    true = np.zeros(20, int)
    first = np.array([0] * 10 + [1] * 2 + [0] * 5 + [1] * 3)
    second = np.array([1] * 10 + [0] * 2 + [0] * 5 + [1] * 3)
    test = paired.mcnemar_exact(seed_of(4, true, first, second))
    assert (test.seed, test.first_only, test.second_only) == (4, 10, 2)
    assert test.pvalue == pytest.approx(2 * (1 + 12 + 66) / 2 ** 12)  # 2 P(X <= 2), X ~ Binomial(12, 1/2)
    assert test.pvalue == stats.binomtest(10, 12, 0.5).pvalue
    rng = np.random.default_rng(1)
    for _ in range(5):
        true, first, second = rng.integers(3, size=(3, 60))
        test = paired.mcnemar_exact(seed_of(0, true, first, second))
        b = int(np.sum((first == true) & (second != true)))
        c = int(np.sum((first != true) & (second == true)))
        assert (test.first_only, test.second_only) == (b, c)
        assert test.pvalue == stats.binomtest(b, b + c, 0.5).pvalue
    assert paired.mcnemar_exact(seed_of(0, [0, 1], [0, 0], [0, 0])).pvalue == 1.0  # no discordant image


def test_holm_adjustment_by_hand():
    # sorted 0.01, 0.03, 0.04 -> x3, x2, x1 = 0.03, 0.06, 0.04 -> non-decreasing 0.03, 0.06, 0.06
    assert paired.holm([0.01, 0.04, 0.03]).tolist() == pytest.approx([0.03, 0.06, 0.06])
    assert paired.holm([0.5, 0.6]).tolist() == [1.0, 1.0]
    assert paired.all_pairs(["net1", "net3", "net4"]) == [("net3", "net1"), ("net4", "net1"), ("net4", "net3")]


def write_predictions(path: pathlib.Path, indices, true, predicted) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    probabilities = np.full((len(true), 3), 0.1)
    probabilities[np.arange(len(true)), predicted] = 0.8
    write_split_predictions(path, np.asarray(indices), np.asarray(true), probabilities, CLASSES)


def test_predictions_are_paired_by_image(tmp_path):
    write_predictions(tmp_path / "a.csv", [3, 1, 2], [0, 1, 2], [0, 2, 2])
    write_predictions(tmp_path / "b.csv", [1, 2, 3], [1, 2, 0], [1, 1, 1])
    first, second = read_split_predictions(tmp_path / "a.csv"), read_split_predictions(tmp_path / "b.csv")
    seed = paired.pair_predictions(1, first, second, "pair")
    by_index = dict(zip(first.indices.tolist(), zip(seed.true.tolist(), seed.first.tolist(), seed.second.tolist())))
    assert by_index == {1: (1, 2, 1), 2: (2, 2, 1), 3: (0, 0, 1)}
    write_predictions(tmp_path / "c.csv", [1, 2, 4], [1, 2, 0], [1, 1, 1])
    with pytest.raises(errors.ConfigError, match="pair: the two runs' test predictions are not of the same images"):
        paired.pair_predictions(1, first, read_split_predictions(tmp_path / "c.csv"), "pair")
    write_predictions(tmp_path / "d.csv", [1, 2, 3], [1, 2, 1], [1, 1, 1])
    with pytest.raises(errors.ConfigError, match="disagree on the true label"):
        paired.pair_predictions(1, first, read_split_predictions(tmp_path / "d.csv"), "pair")


def write_finished_run(folder: pathlib.Path, name: str, true, selected, last) -> None:
    model, variant, seed = name.split("-")
    config = base_config()
    config.seed, config.data.variant = int(seed.removeprefix("seed")), variant
    config.model.enhancer = "none" if model == "net1" else "urnet"
    confusion = np.zeros((3, 3), int)
    np.add.at(confusion, (true, selected), 1)
    (folder / name / "eval").mkdir(parents=True)
    (folder / name / "config.json").write_text(json.dumps(config.to_dict()))
    (folder / name / "metrics.jsonl").write_text("")
    (folder / name / "eval" / "metrics.json").write_text(json.dumps(metrics_from_confusion(confusion, CLASSES)))
    indices = np.arange(len(true))
    write_predictions(predictions_file(folder / name / "eval", "test"), indices, true, selected)
    write_predictions(predictions_file(folder / name / "eval_last", "test"), indices, true, last)


def test_report_block_holds_the_bootstrap_comparisons_of_the_study(tmp_path):
    """A results folder with per-image predictions gets the paired table: the comparisons that study.json
    names, at the selected and the last epoch, differences equal to the predictions' own."""
    rng = np.random.default_rng(2)
    folder = tmp_path / "study_new"
    true = rng.integers(3, size=90)
    expected = {}
    for seed in (1, 2, 3):
        net1 = np.where(rng.random(90) < 0.7, true, (true + 1) % 3)
        net4 = np.where(rng.random(90) < 0.9, true, (true + 1) % 3)
        write_finished_run(folder, f"net1-raw-seed{seed}", true, net1, net1)
        write_finished_run(folder, f"net4-raw-seed{seed}", true, net4, true)  # last epoch: all right
        expected[seed] = (np.mean(net4 == true) - np.mean(net1 == true), 1.0 - np.mean(net1 == true))
    (folder / "study.json").write_text(json.dumps({"comparisons": [["net1", "net4"]]}))
    assert "| Net1 − Net4 | selected |" in report.results_block(folder)  # as study.json names it
    (folder / "study.json").write_text(json.dumps({"comparisons": [["net4", "net1"]]}))
    block = report.results_block(folder)
    lines = [line for line in block.splitlines()
             if line.startswith(("| Net4 − Net1 | selected |", "| Net4 − Net1 | last |"))]
    assert [line.split(" | ")[1] for line in lines] == ["selected", "last"]
    for line, epoch in zip(lines, (0, 1)):
        mean = 100 * np.mean([expected[seed][epoch] for seed in (1, 2, 3)])
        assert line.split(" | ")[3].startswith(paired.signed(mean) + " [")
        assert line.split(" | ")[2] == "3"
    assert "makes 4 interval comparisons (2 rows x 2 metrics)" in block
    assert "| Net1 − Net4 |" not in block  # only the named comparison
    (folder / "study.json").write_text("{}")
    assert report.results_block(folder) == block  # by default every pair, the later model first
