import numpy as np
import pytest

from tfaccel import Tolerance, ValidationError
from tfaccel.core.validation import classification_accuracy, compare_outputs


def test_identical_outputs_compare_as_equal():
    x = {"logits": np.random.default_rng(0).standard_normal((4, 3)).astype("float32")}
    c = compare_outputs(x, {"logits": x["logits"].copy()})
    assert c.max_abs_diff == 0 and c.min_cosine == pytest.approx(1.0)
    assert c.breaches(Tolerance()) == []


def test_perturbation_is_measured_and_breaches_a_tight_tolerance():
    rng = np.random.default_rng(0)
    ref = {"a": rng.standard_normal((4, 8, 5)), "b": rng.standard_normal((4, 5))}
    got = {"a": ref["a"] + 0.01, "b": ref["b"].copy()}
    c = compare_outputs(ref, got)
    assert c.max_abs_diff == pytest.approx(0.01)
    assert c.per_output["b"]["max_abs_diff"] == 0
    assert c.breaches(Tolerance(max_abs_diff=1e-3, min_cosine=None)) == ["max abs diff 0.01 > 0.001"]
    assert c.breaches(Tolerance(max_abs_diff=0.02, min_cosine=0.99)) == []


def test_sign_flip_has_cosine_minus_one():
    ref = {"y": np.ones((2, 4))}
    c = compare_outputs(ref, {"y": -np.ones((2, 4))})
    assert c.min_cosine == pytest.approx(-1.0)


def test_non_finite_outputs_always_breach():
    ref = {"y": np.ones((2, 3))}
    got = {"y": np.array([[1, np.nan, 1], [1, 1, 1]])}
    assert compare_outputs(ref, got).breaches(Tolerance(max_abs_diff=10, min_cosine=None))


def test_accuracy_drop_breach_is_reported_in_points():
    c = compare_outputs({"y": np.ones((1, 2))}, {"y": np.ones((1, 2))})
    c.reference_accuracy, c.accuracy = 0.95, 0.93
    (msg,) = c.breaches(Tolerance(max_accuracy_drop=0.01))
    assert "2.00 points" in msg


def test_mismatched_output_names_raise():
    with pytest.raises(ValidationError, match="output names"):
        compare_outputs({"logits": np.ones(2)}, {"output_0": np.ones(2)})


def test_tolerance_validates_and_round_trips():
    t = Tolerance(max_abs_diff=1e-3, min_cosine=0.99, max_accuracy_drop=None)
    assert Tolerance.from_config(t.get_config()) == t
    with pytest.raises(ValueError, match="max_abs_diff=-1"):
        Tolerance(max_abs_diff=-1)
    with pytest.raises(ValueError, match="min_cosine=2"):
        Tolerance(min_cosine=2)
    with pytest.raises(ValueError, match="Unknown Tolerance fields"):
        Tolerance.from_config({"atol": 1})


def test_classification_accuracy_batches_correctly():
    labels = np.array([0, 1, 2, 1, 0])

    def runner(inputs):  # predicts class = x mod 3
        x = inputs["x"]
        return {"logits": np.eye(3)[x % 3]}

    assert classification_accuracy(runner, {"x": np.array([0, 1, 2, 4, 5])}, labels, batch_size=2) == 0.8


def test_classification_accuracy_pads_the_last_batch_so_the_runner_sees_one_batch_size():
    # 5 examples in batches of 2: the last batch (one row) is padded to 2 and its copy's prediction dropped
    # (an XLA-compiled artifact would otherwise compile again for batch 1). Class = x mod 3: the fourth
    # prediction is wrong, the last right, so counting the padded copy too would give 5/5 instead of 4/5.
    labels = np.array([0, 1, 2, 0, 2])
    seen = []

    def runner(inputs):
        seen.append(len(inputs["x"]))
        return {"logits": np.eye(3)[inputs["x"] % 3]}

    assert classification_accuracy(runner, {"x": np.array([0, 1, 2, 4, 5])}, labels, batch_size=2) == 0.8
    assert seen == [2, 2, 2]
    seen.clear()
    assert classification_accuracy(runner, {"x": np.array([0, 1, 2])}, labels[:3], batch_size=8) == 1.0
    assert seen == [3]  # one batch smaller than batch_size: one shape anyway, not padded
