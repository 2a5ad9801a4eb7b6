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


def test_personas_judged_together_are_judged_on_the_prompts_they_get_one_by_one(monkeypatch):
    """A cluster's adapter and each device's own are scored on the same held-out prompts: the prompts are
    taken in turn from each persona, not mostly from the first one (issue 18: a 3-device cluster was judged
    on 20 of its first device's prompts and 4 of the second's, local-only on 8 of each)."""
    from types import SimpleNamespace

    from models.digits.backend import DigitsBackend
    from models.digits.data import make_personas
    from models.digits.evaluate import sample_for_personas

    asked = []
    monkeypatch.setattr(DigitsBackend, "encode_prompts", lambda self, prompts: asked.append(list(prompts))
                        or torch.zeros(len(prompts), 4))
    monkeypatch.setattr(DigitsBackend, "generate", lambda self, enc, **kw: torch.zeros(enc.shape[0], 1, 16, 16))
    unet = SimpleNamespace(config=SimpleNamespace(in_channels=1, sample_size=16, cross_attention_dim=4))
    personas = make_personas(3, 1, seed=0)
    _, digits = sample_for_personas(unet, personas, samples=24)
    together = asked.pop()
    alone = [sample_for_personas(unet, [p], samples=8)[1] for p in personas]
    assert sorted(together) == sorted(q for _ in personas for q in asked.pop(0))
    assert together[:3] == [p.test_prompts[0] for p in personas]
    assert sorted(digits.tolist()) == sorted(torch.cat(alone).tolist())


def _one_read_right(style: str) -> tuple[torch.Tensor, int]:
    """A real styled digit from the private half that the evaluator reads right (digit and style)."""
    x, y = private_digits()
    images = apply_style(x[:50], style)
    digit_pred, style_pred = load_evaluator().predict(images)
    j = int(torch.nonzero((digit_pred == y[:50]) & (style_pred == STYLES.index(style)))[0])
    return images[j:j + 1].repeat(2, 1, 1, 1), int(y[j])


@pytest.mark.parametrize("style", ("bold", "framed"))
def test_joint_accuracy_counts_a_real_styled_digit_as_right(style):
    image, digit = _one_read_right(style)
    assert evaluate(image, [digit, digit], style)["joint_acc"] == 1.0


def test_joint_accuracy_counts_the_wrong_style_as_wrong():
    image, digit = _one_read_right("bold")
    result = evaluate(image, [digit, digit], "thin")
    assert result["joint_acc"] == 0.0 and result["digit_acc"] == 1.0


def test_joint_accuracy_counts_the_wrong_digit_as_wrong():
    image, digit = _one_read_right("bold")
    wrong = (digit + 1) % 10
    result = evaluate(image, [wrong, wrong], "bold")
    assert result["joint_acc"] == 0.0 and result["style_acc"] == 1.0


def test_joint_accuracy_of_real_held_out_styled_digits_is_high_and_at_most_each_part():
    x, y = private_digits()
    result = evaluate(apply_style(x[:300], "slanted"), y[:300], "slanted")
    assert 0.85 <= result["joint_acc"] <= min(result["digit_acc"], result["style_acc"])


def test_unseen_prompts_are_sampled_for_the_unseen_digits(monkeypatch):
    from types import SimpleNamespace

    from models.digits.backend import DigitsBackend
    from models.digits.data import make_personas
    from models.digits.evaluate import sample_for_personas

    asked = []
    monkeypatch.setattr(DigitsBackend, "encode_prompts", lambda self, prompts: asked.append(list(prompts))
                        or torch.zeros(len(prompts), 4))
    monkeypatch.setattr(DigitsBackend, "generate", lambda self, enc, **kw: torch.zeros(enc.shape[0], 1, 16, 16))
    unet = SimpleNamespace(config=SimpleNamespace(in_channels=1, sample_size=16, cross_attention_dim=4))
    persona = make_personas(1, 1, seed=0, images_per_client=4, classes_per_client=2, held_out=4, unseen=6)[0]
    _, digits = sample_for_personas(unet, [persona], samples=6, which="unseen")
    assert asked.pop() == list(persona.unseen_prompts)
    assert not set(digits.tolist()) & set(persona.train_digits.tolist())
    with pytest.raises(ValueError, match="no unseen prompts"):
        sample_for_personas(unet, make_personas(1, 1, seed=0), samples=2, which="unseen")
