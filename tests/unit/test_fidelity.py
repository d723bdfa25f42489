"""The fuse fidelity numbers: KL, max logit difference, retained effect and the warning."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mlxsft.export.fuse import Fidelity, fidelity, mean_kl


def test_mean_kl_exact():
    p = [np.array([[0.0, 0.0], [1.0, 1.0]])]  # uniform twice
    q = [np.array([[0.0, math.log(3.0)], [5.0, 5.0]])]  # (0.25, 0.75), uniform
    want = (0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0) + 0.0) / 2
    assert mean_kl(p, q) == pytest.approx(want, abs=1e-12)
    assert mean_kl(p, p) == 0.0


def test_retained_and_warning():
    base = [np.zeros((2, 3))]
    adapted = [np.array([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]])]
    same = fidelity(adapted, adapted, base)
    assert same.max_abs_diff == 0.0 and same.retained == 1.0 and same.warning is None
    erased = fidelity(adapted, base, base)  # fused behaves like the base again
    assert erased.retained == pytest.approx(0.0) and erased.max_abs_diff == 2.0
    assert "erased most of the adapter's effect" in erased.warning
    half = [a / 2 for a in adapted]
    r = fidelity(adapted, half, base).retained
    assert 0.5 < r < 1.0  # KL is not linear in the logits, but half way keeps most
    full = Fidelity(0.0, 0.0, None, 4)
    assert full.retained == 1.0 and full.warning is None and len(full.lines()) == 1
    assert "adapter_effect_retained" not in full.as_dict()
