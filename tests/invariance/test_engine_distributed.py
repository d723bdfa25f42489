"""2 ranks x b rows == 1 rank x 2b rows for the compiled train step (mlx.launch, ring backend,
loopback). The CLI-level distributed run is tested with `mlxsft train` elsewhere."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import mlx.core as mx, mlx.optimizers as optim, numpy as np
    from mlx.utils import tree_flatten
    from mlxsft import _mlxlm
    from mlxsft.data.batching import epoch_batches
    from mlxsft.data.types import Encoded
    from mlxsft.model.lora import apply_adapters
    from mlxsft.train import step as step_mod
    from mlxsft.train.step import make_train_step

    if len(sys.argv) > 3:  # small messages: many chained collectives in one compiled graph
        step_mod.REDUCE_GROUP = int(sys.argv[3])

    group = mx.distributed.init(strict=False)
    model = _mlxlm.load_model(sys.argv[2])[0]
    mx.random.seed(0)
    apply_adapters(model, fine_tune_type="lora", rank=4, alpha=8.0)
    rng = np.random.default_rng(0)
    model.load_weights([
        (k, v + mx.array(0.05 * rng.standard_normal(v.shape).astype(np.float32)))
        for k, v in tree_flatten(model.trainable_parameters())
    ], strict=False)
    data = []
    for k in range(30):
        n = int(rng.integers(4, 30))
        mask = (rng.random(n) < 0.7).astype(np.int32)
        mask[0] = 0
        data.append(Encoded(rng.integers(3, 500, n).astype(np.int32), mask, f"t:{k}"))
    batches = epoch_batches(data, batch_size=4, max_seq_len=32, pack=True, seed=0, epoch=0)
    size, rank = group.size(), group.rank()
    reduce = (lambda x: mx.distributed.all_sum(x, group=group)) if size > 1 else None
    # SGD: weights compare gradients directly (Adam magnifies rounding of near-zero grads)
    step = make_train_step(model, optim.SGD(learning_rate=0.5), max_grad_norm=1.0, all_reduce=reduce)
    out = [step(b.split(size)[rank].split(2)) for b in batches[:3]]
    if rank == 0:
        w = {k: np.array(v).tolist() for k, v in tree_flatten(model.trainable_parameters())}
        json.dump({"out": out, "w": w}, open(sys.argv[1], "w"))
    """
)


def run(tmp_path: Path, model: Path, n_ranks: int, *extra: str) -> dict:
    script, out = tmp_path / "dp.py", tmp_path / f"out{n_ranks}.json"
    script.write_text(SCRIPT)
    cmd = [sys.executable, str(script), str(out), str(model), *extra]
    if n_ranks > 1:
        launch = shutil.which("mlx.launch") or pytest.skip("mlx.launch not found")
        cmd = [launch, "-n", str(n_ranks), "--backend", "ring", "--", *cmd]
    subprocess.run(cmd, check=True, timeout=300, capture_output=True)
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("reduce_group", [None, 64], ids=["one-message", "many-messages"])
def test_two_ranks_equal_one_rank(tmp_path, tiny_llama, reduce_group):
    extra = () if reduce_group is None else (str(reduce_group),)
    one, two = run(tmp_path, tiny_llama, 1, *extra), run(tmp_path, tiny_llama, 2, *extra)
    for (l1, n1), (l2, n2) in zip(one["out"], two["out"], strict=True):
        assert n1 == n2 and l1 == pytest.approx(l2, rel=1e-5)
    for k, w in one["w"].items():
        np.testing.assert_allclose(two["w"][k], w, rtol=1e-5, atol=1e-6, err_msg=k)
