"""The data-scarcity sweep's pieces: its groups, its statistics and its in-process federation."""

import math

import numpy as np
import pytest
from scipy import stats

from aggregator.simulation.fleet import FleetConfig
from benchmarks._inprocess import InProcessFederation, Variant, run_alone, seen_and_unseen_scorer
from benchmarks._scarcity import SMOKE, interval, split_groups, split_of
from models.digits.data import make_personas


def test_split_groups_put_the_largest_styles_devices_in_two_clusters_and_keep_the_rest():
    personas = make_personas(7, 3, seed=0, sizes=(1, 4, 2), styles=("bold", "slanted", "thin"))
    groups = split_groups({f"d{i}": p for i, p in enumerate(personas)})
    assert [groups[f"d{i}"] for i in range(7)] == [0, 1, 1, 3, 3, 2, 2]
    assert split_of(groups, {g: list(groups.values()).count(g) for g in set(groups.values())}) == [1, 3]


def test_device_seeds_do_not_repeat_across_the_fleets_of_a_sweep():
    from benchmarks._inprocess import device_seed

    seeds = [device_seed(fleet, i) + rnd for fleet in range(8) for i in range(12) for rnd in range(4)]
    assert len(set(seeds)) == len(seeds)


def test_seen_prompt_overlap_grows_with_the_images_a_persona_phrased():
    from benchmarks._scarcity import Sweep, seen_prompt_overlap

    sweep = Sweep(headline_seeds=1, seeds_scarce=1, seeds_plenty=1)
    shares = [seen_prompt_overlap(sweep, n) for n in (4, 80)]
    assert 0.0 <= shares[0] < shares[1] <= 1.0


def test_interval_is_the_mean_with_a_95_percent_t_half_width():
    out = interval([0.2, 0.4, 0.6])
    assert out["mean"] == pytest.approx(0.4)
    assert out["ci95"] == pytest.approx(stats.t.ppf(0.975, 2) * 0.2 / math.sqrt(3))
    assert interval([0.5])["ci95"] is None


@pytest.fixture(scope="module")
def scarce():
    cfg = FleetConfig(devices=4, styles=2, sizes=(2, 2), rounds=1, local_steps=2, eval_samples=4, eval_steps=2,
                      task_noise=0.0, seed=0)
    personas = make_personas(4, 2, seed=0, sizes=(2, 2), images_per_client=4, classes_per_client=3, held_out=2,
                             unseen=4)
    return cfg, personas


@pytest.mark.slow
def test_the_in_process_federation_groups_devices_by_task_and_scores_seen_and_unseen(scarce):
    cfg, personas = scarce
    out = InProcessFederation(cfg, Variant("ours", method="ours"), personas, scorer=seen_and_unseen_scorer(cfg)).run()
    assert out["ari"] == 1.0
    assert set(out["curves"]) == {0, 1}
    for kind in ("seen", "unseen"):
        styles = out["curves"][1][kind]["styles"]
        assert set(styles) == {p.style for p in personas}
        assert all(0.0 <= m["joint_acc"] <= min(m["digit_acc"], m["style_acc"]) for m in styles.values())
    assert out["losses"][1]["after"] < out["losses"][1]["before"]


@pytest.mark.slow
def test_local_scores_only_the_rounds_asked_for_and_the_last(scarce):
    cfg, personas = scarce
    out = run_alone(cfg, pooled=False, personas=personas, scorer=seen_and_unseen_scorer(cfg), eval_rounds=[])
    assert set(out["curves"]) == {cfg.rounds}
    assert np.isfinite(out["curves"][1]["unseen"]["styles"][personas[0].style]["frechet"])


def test_the_smoke_sweep_is_scored_in_its_scarcest_setting():
    assert SMOKE.headline_images == min(SMOKE.images) <= 16


def test_a_sweep_stopped_early_reports_each_setting_with_the_seeds_every_method_finished():
    from benchmarks._scarcity import Sweep, covered, jobs

    sweep = Sweep()
    finished = {j[:4]: {} for j in jobs(sweep)[:82]}  # the headline's 5 seeds, the interaction fleet, 2 of the rest
    got = covered(finished, sweep)
    assert got.seeds(4) == list(range(5)) and got.interaction_seeds == 8
    assert got.seeds(8) == got.seeds(16) == [0, 1] and got.seeds(80) == [0]
    assert {j[:4] for j in jobs(got)} <= set(finished)


def test_resume_does_not_reuse_headline_runs_scored_only_at_their_last_round():
    from benchmarks._scarcity import Sweep, json_safe, reusable

    sweep = Sweep()
    recorded_result = {"settings": json_safe(sweep.settings()), "runs": {
        "sweep/4/0/local": {"curves": {str(r): {} for r in range(sweep.rounds + 1)}},
        "sweep/4/1/local": {"curves": {str(sweep.rounds): {}}},
        "sweep/8/0/local": {"curves": {str(sweep.rounds): {}}}}}
    assert set(reusable(recorded_result, sweep)) == {("sweep", 4, 0, "local"), ("sweep", 8, 0, "local")}
    assert reusable(recorded_result | {"settings": {}}, sweep) == {}
