import pytest
import torch

from models.digits.data import STYLES, apply_style, make_personas, private_digits, public_digits, style_templates

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def test_there_are_at_least_eight_deterministic_styles():
    assert len(STYLES) >= 8
    x, _ = public_digits()
    for style in STYLES:
        a, b = apply_style(x[:5], style), apply_style(x[:5], style)
        assert torch.equal(a, b)
        assert a.shape == (5, 1, 16, 16) and 0.0 <= float(a.min()) and float(a.max()) <= 1.0
        assert not torch.equal(a, x[:5]), style


def test_every_style_has_eight_paraphrases():
    for style in STYLES:
        assert len(set(style_templates(style))) >= 8


def test_public_and_private_halves_are_disjoint_and_cover_the_dataset():
    xp, yp = public_digits()
    xq, yq = private_digits()
    assert len(yp) + len(yq) == 1797
    flat_p = {tuple(r.flatten().tolist()) for r in xp}
    assert not any(tuple(r.flatten().tolist()) in flat_p for r in xq[:200])


def test_personas_are_deterministic_for_a_seed():
    a = make_personas(6, 3, seed=5)
    b = make_personas(6, 3, seed=5)
    c = make_personas(6, 3, seed=6)
    assert [p.train_prompts for p in a] == [p.train_prompts for p in b]
    assert all(torch.equal(p.train_images, q.train_images) for p, q in zip(a, b))
    assert [p.train_prompts for p in a] != [p.train_prompts for p in c]


def test_personas_have_one_style_skewed_digits_and_own_words():
    personas = make_personas(8, 4, seed=0)
    assert [p.style for p in personas] == [STYLES[i % 4] for i in range(8)]
    for p in personas:
        assert len(p.train_prompts) == len(p.train_images)
        assert len(p.test_prompts) == len(p.test_images) > 0
        for prompt, d in zip(p.train_prompts, p.train_digits.tolist()):
            assert str(d) in prompt or DIGIT_WORDS[d] in prompt, prompt
    peak = [float(torch.bincount(p.train_digits, minlength=10).max()) / (len(p.train_digits) / 10) for p in personas]
    assert sum(peak) / len(peak) > 2.0  # skewed digit mixes, not uniform ones
    same_style = [p for p in personas if p.style == personas[0].style]
    shared = set(same_style[0].train_prompts) & set(same_style[1].train_prompts)
    assert len(shared) < 0.25 * len(set(same_style[0].train_prompts))


def test_uneven_groups_follow_sizes():
    personas = make_personas(7, 3, seed=0, sizes=[4, 2, 1])
    assert [p.style for p in personas] == [STYLES[0]] * 4 + [STYLES[1]] * 2 + [STYLES[2]]


@pytest.mark.parametrize("kwargs", [
    {"n_clients": 4, "n_styles": len(STYLES) + 1, "seed": 0},
    {"n_clients": 0, "n_styles": 2, "seed": 0},
    {"n_clients": 4, "n_styles": 2, "seed": 0, "sizes": [3, 3]},
    {"n_clients": 2, "n_styles": 1, "seed": 0, "styles": ["no-such-style"]},
    {"n_clients": 2, "n_styles": 1, "seed": 0, "classes_per_client": 10},
    {"n_clients": 2, "n_styles": 1, "seed": 0, "held_out": 0},
    {"n_clients": 2, "n_styles": 1, "seed": 0, "unseen": 4},
])
def test_bad_persona_arguments_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        make_personas(**kwargs)


def test_unknown_style_raises_value_error():
    with pytest.raises(ValueError, match="unknown style"):
        apply_style(torch.zeros(1, 1, 16, 16), "sparkly")


FEW = {"n_clients": 6, "n_styles": 2, "seed": 3, "images_per_client": 8, "classes_per_client": 3, "held_out": 6,
       "unseen": 10}


def test_few_class_personas_own_exactly_their_classes_spread_evenly():
    for p in make_personas(**FEW):
        counts = torch.bincount(p.train_digits, minlength=10)
        assert len(p.train_images) == 8 and int((counts > 0).sum()) == 3
        assert int(counts.max() - counts[counts > 0].min()) <= 1
        assert set(p.test_digits.tolist()) <= set(p.train_digits.tolist())


def test_held_out_images_are_extra_and_never_training_images():
    for p in make_personas(**FEW):
        assert len(p.test_images) == len(p.test_prompts) == 6
        train = {tuple(r.flatten().tolist()) for r in p.train_images}
        assert not any(tuple(r.flatten().tolist()) in train for r in p.test_images)


def test_a_persona_given_more_images_keeps_its_digits_test_set_and_earlier_images():
    few, more = make_personas(**FEW), make_personas(**(FEW | {"images_per_client": 32}))
    for a, b in zip(few, more):
        assert a.digits and set(a.digits) == set(b.digits)
        assert torch.equal(a.test_images, b.test_images) and a.test_prompts == b.test_prompts
        assert a.unseen_prompts == b.unseen_prompts
        larger = {tuple(r.flatten().tolist()) for r in b.train_images}
        assert all(tuple(r.flatten().tolist()) in larger for r in a.train_images)


def test_unseen_prompts_ask_for_other_digits_in_words_the_persona_never_used():
    for p in make_personas(**FEW):
        assert len(p.unseen_prompts) == len(p.unseen_digits) == 10
        assert not set(p.unseen_digits.tolist()) & set(p.train_digits.tolist())
        assert len(set(p.unseen_digits.tolist())) == 7  # every digit it does not own
        for prompt, d in zip(p.unseen_prompts, p.unseen_digits.tolist()):
            assert str(d) in prompt or DIGIT_WORDS[d] in prompt, prompt
            assert not any(t.format(d=w) == prompt for t in p.templates for w in (str(d), DIGIT_WORDS[d])), prompt


def test_default_personas_have_no_unseen_prompts():
    assert all(p.unseen_prompts == () and len(p.unseen_digits) == 0 for p in make_personas(4, 2, seed=0))
