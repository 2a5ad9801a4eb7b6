import numpy as np
import pytest

from models.digits.data import style_templates
from models.text import PromptEncoder


def test_encode_returns_normalised_float32_rows():
    v = PromptEncoder().encode(["a chunky 7", "a skinny 3", "an italic 9"])
    assert v.shape == (3, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)


def test_batches_give_the_same_vectors_as_one_call():
    prompts = [f"a bold {d}" for d in range(10)]
    whole = PromptEncoder(batch_size=64).encode(prompts)
    batched = PromptEncoder(batch_size=3).encode(prompts)
    np.testing.assert_allclose(whole, batched, atol=1e-5)


def test_paraphrases_of_a_style_are_closer_than_other_styles():
    enc = PromptEncoder()
    framed = enc.encode([t.format(d=7) for t in style_templates("framed")])
    blurred = enc.encode([t.format(d=7) for t in style_templates("blurred")])
    within = (framed @ framed.T)[np.triu_indices(len(framed), 1)].mean()
    across = (framed @ blurred.T).mean()
    assert within > across + 0.05


@pytest.mark.parametrize("bad", [[], [""], ["   "], "a single string", [None]])
def test_bad_prompts_raise_value_error(bad):
    with pytest.raises(ValueError):
        PromptEncoder().encode(bad)
