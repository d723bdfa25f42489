"""OpenBLAS for the Linux mlx-cpu wheel: detection, in-process load, re-exec, hint, opt-out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from mlxsft import blas

STATUS = blas.blas_status()
needs_reference = pytest.mark.skipif(
    STATUS.reference_blas is None, reason="not the Linux mlx-cpu wheel (no bundled reference BLAS)"
)
needs_openblas = pytest.mark.skipif(STATUS.openblas is None, reason="OpenBLAS not installed")

# Times a 512 x 512 float32 matmul and prints what the BLAS call chose, speed and a checksum.
_PROBE = textwrap.dedent(
    """
    import json, sys, time
    from mlxsft.blas import maybe_reexec_with_fast_blas
    if "import-first" in sys.argv:
        import mlx.core
    did = maybe_reexec_with_fast_blas([sys.executable, *sys.argv, "child"])
    import mlx.core as mx
    a = mx.random.normal((512, 512), key=mx.random.key(0))
    b = mx.random.normal((512, 512), key=mx.random.key(1))
    mx.eval(a @ b)
    t = time.perf_counter()
    for _ in range(3):
        c = a @ b
        mx.eval(c)
    gflops = 3 * 2 * 512**3 / (time.perf_counter() - t) / 1e9
    maps = open("/proc/self/maps").read()
    get = getattr(__import__("ctypes").CDLL(None), "openblas_get_num_threads", None)
    print(json.dumps({"did": did, "gflops": gflops, "c": c[:4, :4].tolist(),
                      "openblas": "openblas" in maps, "child": "child" in sys.argv,
                      "threads": get() if get else None}))
    """
)


def _probe(tmp_path, *args: str, **env_extra: str) -> dict:
    script = tmp_path / "probe.py"
    script.write_text(_PROBE)
    drop = ("LD_PRELOAD", blas.OPT_OUT, blas.THREADS)
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(env_extra)
    out = subprocess.run(
        [sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_reference
@needs_openblas
def test_openblas_is_faster_and_gives_the_same_results(tmp_path):
    slow = _probe(tmp_path, MLXSFT_NO_BLAS_PRELOAD="1")
    fast = _probe(tmp_path)
    assert (slow["did"], slow["openblas"]) == ("off", False)
    assert (fast["did"], fast["openblas"], fast["child"]) == ("loaded", True, False)
    assert fast["gflops"] > 3 * slow["gflops"], (fast["gflops"], slow["gflops"])
    for r_slow, r_fast in zip(slow["c"], fast["c"], strict=True):
        assert r_fast == pytest.approx(r_slow, rel=1e-4, abs=1e-4)


@needs_reference
@needs_openblas
def test_reexec_with_ld_preload_when_mlx_already_imported(tmp_path):
    got = _probe(tmp_path, "import-first")
    # the child ran with LD_PRELOAD, found OpenBLAS mapped and did nothing more
    assert (got["child"], got["did"], got["openblas"]) == (True, "already", True)
    assert got["threads"] == 1


@needs_reference
@needs_openblas
def test_one_openblas_thread_unless_the_user_says_otherwise(tmp_path):
    # threaded OpenBLAS spin-waits and collapses when other processes hold the cores
    assert _probe(tmp_path)["threads"] == 1
    assert _probe(tmp_path, OPENBLAS_NUM_THREADS="2")["threads"] == 2
    assert blas.preload_env({})[blas.THREADS] == "1"
    assert blas.preload_env({blas.THREADS: "3"})[blas.THREADS] == "3"


@needs_reference
def test_hint_printed_once_without_openblas(monkeypatch, capsys):
    monkeypatch.setattr(blas, "OPENBLAS_CANDIDATES", ("/nonexistent/libblas.so.3",))
    monkeypatch.setattr(blas, "_wheel_openblas", lambda: None)
    monkeypatch.setattr(blas, "_hinted", False)
    monkeypatch.delenv(blas.OPT_OUT, raising=False)
    monkeypatch.setattr(blas, "_openblas_loaded", lambda: False)
    assert blas.maybe_reexec_with_fast_blas() == "hint"
    assert blas.maybe_reexec_with_fast_blas() == "hint"
    err = capsys.readouterr().err
    assert err.count(blas.INSTALL_HINT) == 1


def test_opt_out(monkeypatch):
    monkeypatch.setenv(blas.OPT_OUT, "1")
    assert blas.maybe_reexec_with_fast_blas() == "off"


def test_no_reexec_inside_a_library_caller(monkeypatch):
    """Under pytest mlx is imported and argv[0] is not `mlxsft`: never exec."""
    monkeypatch.delenv(blas.OPT_OUT, raising=False)
    monkeypatch.setattr(blas, "_openblas_loaded", lambda: False)
    monkeypatch.setattr(
        blas, "blas_status", lambda: blas.BlasStatus(blas.Path("x"), blas.Path("y"), False)
    )
    import mlx.core  # noqa: F401

    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("must not exec"))
    assert blas.maybe_reexec_with_fast_blas() == "too-late"


@needs_reference
@needs_openblas
def test_preload_env():
    env = blas.preload_env({"LD_PRELOAD": "/x.so"})
    assert env["LD_PRELOAD"] == f"{STATUS.openblas}:/x.so"
    assert blas.preload_env(env)["LD_PRELOAD"] == env["LD_PRELOAD"]  # not twice


needs_wheel = pytest.mark.skipif(
    blas._wheel_openblas() is None, reason=f"{blas.WHEEL_PACKAGE} not installed"
)


@needs_reference
@needs_wheel
def test_pip_installed_openblas_needs_no_system_package(tmp_path):
    """With no system OpenBLAS (candidates emptied), the wheel's OpenBLAS is loaded, with mlx's own
    bundled libgfortran beside it (not the system's), is faster and agrees with the reference."""
    script = tmp_path / "probe.py"
    script.write_text(
        _PROBE.replace(
            "from mlxsft.blas import maybe_reexec_with_fast_blas\n",
            "import mlxsft.blas as B\nB.OPENBLAS_CANDIDATES = ()\n"
            "from mlxsft.blas import maybe_reexec_with_fast_blas\n",
        ).replace(
            '"openblas": "openblas" in maps,',
            '"openblas": "ngsolve_openblas" in maps, "fortran": [l.split()[-1] for l in '
            'maps.splitlines() if "libgfortran" in l][:1],',
        )
    )
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", blas.OPT_OUT)}
    env["MLXSFT_CACHE"] = str(tmp_path / "cache")
    run = [sys.executable, str(script)]
    fast = json.loads(subprocess.run(run, env=env, capture_output=True, text=True, check=True,
                                     timeout=120).stdout.splitlines()[-1])  # fmt: skip
    slow = _probe(tmp_path, MLXSFT_NO_BLAS_PRELOAD="1")
    assert (fast["did"], fast["openblas"]) == ("loaded", True)
    assert "mlx_cpu.libs" in fast["fortran"][0]  # mlx's copy, found through the symlink dir
    # a loose bound: measured 12x on an idle machine, 2.7x with 7 jobs sharing its 2 cores
    assert fast["gflops"] > 1.5 * slow["gflops"], (fast["gflops"], slow["gflops"])
    for r_slow, r_fast in zip(slow["c"], fast["c"], strict=True):
        assert r_fast == pytest.approx(r_slow, rel=1e-4, abs=1e-4)
    links = list((tmp_path / "cache" / "openblas").iterdir())
    assert len(links) == 1 and (links[0] / "libgfortran.so.5").is_symlink()
