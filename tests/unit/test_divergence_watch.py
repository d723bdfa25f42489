"""DivergenceWatch: which loss / grad-norm sequences stop a run, and from which step."""

from __future__ import annotations

import math

import pytest

from mlxsft.train.divergence import DivergenceWatch

LN_V = math.log(512)


def _run(losses, norms=None, **kw):
    watch = DivergenceWatch(512, **kw)
    norms = norms or [1.0] * len(losses)
    for step, (loss, norm) in enumerate(zip(losses, norms, strict=True), start=1):
        if reason := watch.observe(step, loss, norm):
            return step, watch.first_bad_step, reason
    reason = watch.finish()
    return None, watch.first_bad_step, reason


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_loss_or_grad_norm_stops_at_once(bad):
    assert _run([2.0, bad])[:2] == (2, 2)
    step, first, reason = _run([2.0, 1.9, 1.8], [1.0, bad, 1.0])
    assert (step, first) == (2, 2) and "gradient norm became" in reason


def test_loss_stuck_at_ln_vocab_after_being_lower_stops_after_patience():
    step, first, reason = _run([2.5, 2.0, LN_V, LN_V + 0.5, LN_V, LN_V, LN_V, 1.0], patience=5)
    assert (step, first) == (7, 3) and "since step 3, after reaching 2.0000" in reason


def test_a_spike_that_recovers_is_not_divergence():
    assert _run([2.5, 2.0, LN_V + 1, LN_V, 1.9, 1.8, LN_V, 1.7]) == (None, None, None)


def test_a_random_model_above_ln_vocab_is_not_divergence_until_it_goes_dead():
    assert _run([LN_V + 0.4] * 10) == (None, None, None)  # a random init is worse than uniform
    # hovering around ln(vocab) is not "having been lower": the drop must be clear (0.5 nats)
    assert _run([LN_V + 0.2, LN_V - 0.3, LN_V, LN_V, LN_V]) == (None, None, None)
    dead = [LN_V + 0.4] + [LN_V] * 6
    step, first, _ = _run(dead, [4.0] + [0.0] * 6, patience=5)
    assert (step, first) == (6, 2)


def test_run_ending_while_stuck_is_reported():
    step, first, reason = _run([2.0, 1.5, LN_V, LN_V], patience=5)
    assert step is None and first == 3 and "ended at or above ln(vocab)" in reason


def test_gradient_norm_explosion():
    norms = [1.0, 1.2, 0.9, 1.1, 1.0, 30.0, 1.0, 5000.0]
    step, first, reason = _run([2.0] * len(norms), norms)
    assert (step, first) == (8, 8) and "exploded to 5e+03" in reason
    assert _run([2.0] * 4, [1.0, 1.0, 1.0, 5000.0]) == (None, None, None)  # too little history
