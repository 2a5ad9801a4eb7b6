import numpy as np
import pytest
import torch

from models.digits.data import STYLES, apply_style, private_digits
from models.digits.evaluate import evaluate, frechet_distance, load_evaluator


@pytest.mark.parametrize("style", STYLES)
def test_classifiers_read_real_held_out_styled_digits(style):
    x, y = private_digits()
    result = evaluate(apply_style(x[:300], style), y[:300], style)
    assert result["digit_acc"] >= 0.9
    assert result["style_acc"] >= 0.9


def test_frechet_distance_separates_styles():
    x, y = private_digits()
    ev = load_evaluator()
    same = ev.frechet(apply_style(x[:200], "bold"), y[:200], "bold")
    other = ev.frechet(apply_style(x[:200], "thin"), y[:200], "bold")
    assert other > 10 * same


def test_frechet_of_identical_sets_is_zero():
    a = np.random.default_rng(0).normal(size=(100, 4))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_evaluate_refuses_bad_arguments():
    with pytest.raises(ValueError):
        evaluate(torch.zeros(4, 1, 8, 8), [1, 2, 3, 4], "bold")
    with pytest.raises(ValueError):
        evaluate(torch.zeros(4, 1, 16, 16), [1, 2, 3, 4], "sparkly")
    with pytest.raises(ValueError):
        evaluate(torch.zeros(4, 1, 16, 16), [1, 2], "bold")
