"""Linux CPU speed: the `mlx[cpu]` wheel bundles the netlib *reference* BLAS, ~10x slower at
matmul than OpenBLAS. We load an OpenBLAS into the global symbol scope *before* mlx is imported
(`dlopen(RTLD_GLOBAL)`: its `cblas_sgemm` then wins symbol lookup over the bundled one, exactly as
with LD_PRELOAD), or, if mlx is already imported, re-exec the command with it in LD_PRELOAD.
Results agree to float rounding. Which OpenBLAS: Debian/Ubuntu's when installed, else the one of
the `ngsolve-openblas` wheel, a dependency of mlxsft on x86-64 Linux (so `pip install` alone gives
the fast path; scipy's `scipy-openblas32/64` wheels cannot serve: their symbols are renamed
`scipy_*`, so they override nothing). Without either we print, once, the command that installs
one. Opt out with MLXSFT_NO_BLAS_PRELOAD=1.

Thread policy: one OpenBLAS thread (OPENBLAS_NUM_THREADS=1) unless the user set
OPENBLAS_NUM_THREADS. Threaded OpenBLAS spin-waits for its peers; when another process holds a
core, a step can take 100x longer (measured: benchmarks/bench_blas.py). One thread is never
slower than the single-threaded reference BLAS, and on a busy machine it is as fast as several.

Only standard library here: this runs before mlx is imported.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
)
WHEEL_PACKAGE = "ngsolve_openblas"  # PyPI's ngsolve-openblas: DYNAMIC_ARCH, pthreads, x86-64
INSTALL_HINT = "sudo apt-get install -y libopenblas0-pthread"
OPT_OUT = "MLXSFT_NO_BLAS_PRELOAD"
THREADS = "OPENBLAS_NUM_THREADS"  # ours: 1 unless the user set it (see the module docstring)
_REEXEC_MARK = "MLXSFT_BLAS_REEXEC"  # set in the child so we never loop
_hinted = False


@dataclass(frozen=True)
class BlasStatus:
    """What BLAS mlx will use in this process and what could be preloaded."""

    reference_blas: Path | None  # the wheel's bundled netlib libblas, None if not found / not Linux
    openblas: Path | None  # a system OpenBLAS we could preload
    preloaded: bool  # OpenBLAS is already in LD_PRELOAD (or mapped into this process)

    @property
    def slow(self) -> bool:
        """True when matmuls run on the reference BLAS."""
        return self.reference_blas is not None and not self.preloaded


def _bundled_reference_blas() -> Path | None:
    """`mlx_cpu.libs/libblas-*.so*` next to the installed `mlx` package (no mlx import)."""
    spec = importlib.util.find_spec("mlx")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:  # a namespace package may have several
        libs = sorted((Path(location).parent / "mlx_cpu.libs").glob("libblas-*.so*"))
        if libs:
            return libs[0]
    return None


def _cache_dir() -> Path:
    env = os.environ.get("MLXSFT_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "mlxsft") / "openblas"


def _wheel_openblas() -> Path | None:
    """The OpenBLAS of the `ngsolve-openblas` wheel (no import: its __init__ would load it), seen
    through a directory of symlinks that also holds `libgfortran.so.5` -> mlx's bundled copy.

    That library needs libgfortran.so.5, which a fresh system may lack; mlx's wheel bundles one
    under a renamed soname. The library's rpath is `$ORIGIN`, so loaded through the symlink it
    finds the symlinked libgfortran beside it. If the directory cannot be made, the plain path
    (which works when the system has libgfortran5).
    """
    spec = importlib.util.find_spec(WHEEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    libs = [p for d in spec.submodule_search_locations for p in Path(d).glob("libopenblas*.so*")]
    if not libs:
        return None
    lib = sorted(libs)[0]
    ref = _bundled_reference_blas()
    fortran = sorted(ref.parent.glob("libgfortran-*.so.5*")) if ref else []
    if not fortran:
        return lib
    links = {"libopenblas.so.0": lib, "libgfortran.so.5": fortran[0]}
    links |= {p.name: p for p in ref.parent.glob("libquadmath-*.so*")}  # libgfortran's $ORIGIN
    key = hashlib.sha256("\0".join(map(str, links.values())).encode()).hexdigest()[:12]
    out = _cache_dir() / key
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, target in links.items():
            link = out / name
            if not (link.is_symlink() and os.readlink(link) == str(target)):
                tmp = out / f".{name}.{os.getpid()}"
                tmp.unlink(missing_ok=True)
                os.symlink(target, tmp)
                os.replace(tmp, link)
    except OSError:
        return lib
    return out / "libopenblas.so.0"


def _openblas_loaded() -> bool:
    if "openblas" in os.environ.get("LD_PRELOAD", ""):
        return True
    try:
        return "openblas" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def blas_status() -> BlasStatus:
    """Detect the reference BLAS, an installed OpenBLAS and whether it is already preloaded."""
    if platform.system() != "Linux":
        return BlasStatus(None, None, False)
    reference = _bundled_reference_blas()
    openblas = next((Path(p) for p in OPENBLAS_CANDIDATES if os.path.exists(p)), None)
    if openblas is None and reference is not None:
        openblas = _wheel_openblas()
    return BlasStatus(reference, openblas, _openblas_loaded())


def preload_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of `env` (default os.environ) with OpenBLAS prepended to LD_PRELOAD when it helps;
    for launching subprocesses (benchmarks, tests) with the fast BLAS."""
    env = dict(os.environ if env is None else env)
    status = blas_status()
    preload = env.get("LD_PRELOAD", "")
    if status.reference_blas and status.openblas and str(status.openblas) not in preload:
        env["LD_PRELOAD"] = ":".join(p for p in (str(status.openblas), env.get("LD_PRELOAD")) if p)
        env.setdefault(THREADS, "1")
    return env


def _invoked_as_cli() -> bool:
    """True for `mlxsft ...` / `python -m mlxsft ...`, never inside pytest or a library caller."""
    arg0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path()
    return arg0.name == "mlxsft" or (arg0.name == "__main__.py" and arg0.parent.name == "mlxsft")


def maybe_reexec_with_fast_blas(argv: list[str] | None = None) -> str:
    """Make mlx's matmuls use OpenBLAS if they would otherwise run on the reference BLAS.

    Call it first thing in a command, before anything imports mlx. Returns what it did:
    "off" (Linux wheel not in use, or MLXSFT_NO_BLAS_PRELOAD=1), "already" (OpenBLAS loaded),
    "loaded" (dlopen'ed before mlx import), "hint" (no OpenBLAS: install command printed once),
    "too-late" (mlx already imported and not run as the `mlxsft` command). If mlx is already
    imported it re-execs `argv` (default: this command line; argv[0] is the interpreter) with
    LD_PRELOAD and does not return.
    """
    global _hinted
    if os.environ.get(OPT_OUT) == "1":
        return "off"
    status = blas_status()
    if status.reference_blas is None:
        return "off"
    if status.preloaded or os.environ.get(_REEXEC_MARK) == "1":
        return "already"
    if status.openblas is None:
        if not _hinted:
            _hinted = True
            print(
                "mlxsft: mlx's Linux CPU wheel uses a slow reference BLAS; training is ~10x "
                f"faster with OpenBLAS: `{INSTALL_HINT}` (mlxsft then preloads it itself)",
                file=sys.stderr,
            )
        return "hint"
    if "mlx.core" not in sys.modules:
        os.environ.setdefault(THREADS, "1")  # read by OpenBLAS when it is loaded, just below
        try:
            ctypes.CDLL(str(status.openblas), mode=ctypes.RTLD_GLOBAL)
        except OSError as exc:  # e.g. a dependency of the library is missing: stay correct, slow
            print(f"mlxsft: could not load {status.openblas} ({exc})", file=sys.stderr)
            return "hint"
        return "loaded"
    if argv is None:
        if not _invoked_as_cli():
            return "too-late"
        argv = list(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    env = preload_env()
    env[_REEXEC_MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)
    return "reexec"  # not reached (execve replaces the process), except under a test's stub
