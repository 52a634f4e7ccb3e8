"""A compiled MaxSim scan for bf16 indexes on x86-64 CPUs (`csrc/maxsim_scan.cpp`), and the choice of kernel.

`MetaEmbedIndex` scans bf16 vectors on CPU with one of:

- ``"amx"``: Intel AMX tiles (CPUs with AMX-BF16, e.g. Sapphire Rapids): the stored bf16 rows are multiplied as
  they are, by the float32 queries split into three bf16 parts (hi + mid + lo = the float32 value), with float32
  accumulation: a float32 product without widening a single candidate value in memory. Where two parts (hi + mid)
  need fewer tiles (batches) and the index knows a bound on its vectors' norms, the scan runs with two and
  certifies each query's top-k against the three-part scores (`top_k`).
- ``"avx2"``: AVX2 + FMA (any other x86-64 CPU from Haswell / Zen on): bf16 widened to float32 in registers; from
  AVX2_GEMM_FROM_ROWS query rows per pass on, blocks widened into an L2-sized per-thread float32 buffer and
  multiplied by a float32 GEMM (MKL's sgemm where torch has it, else ATen's mm), all in C++.
- ``"torch"``: the pure-torch tiled scan (`modeling_metaembed.scoring_metaembed.scan_maxsim`), used whenever no
  kernel applies: another architecture, another storage dtype, a GPU, D not a multiple of 32 (AMX) / 16 (AVX2),
  or a kernel that cannot be compiled here (no compiler: a warning names the reason, once).

The kernel is compiled once per machine on first use (``torch.utils.cpp_extension``: a C++ compiler and ninja, which
this package depends on; about 35 s on a 2-core machine, announced by one log line) into `kernel_dir()`, under a name
that hashes its source, flags and torch version; later processes load the built module without compiling (no
compiler or ninja needed then). `python -m metaembed.retrieval.scan_kernel` builds it ahead of time, e.g. while
building an image whose run time has no compiler. Only x86-64 Linux builds it: elsewhere the torch scan runs with no
compile. The AMX code needs GCC 11 or Clang 12; an older compiler (or `METAEMBED_KERNEL_AMX=0`) builds the module without it,
and the AVX2 kernel stays. Kernels are only used for scans that read at least `KERNEL_FROM_BYTES` (small ones gain
nothing).
`METAEMBED_CPU_KERNEL` = ``auto`` (default), ``amx``, ``avx2`` or ``torch`` forces a choice (``amx`` / ``avx2`` for
every size; a forced kernel the CPU lacks falls back to the next one available). `METAEMBED_KERNEL_DIR` sets where
the built module lives (default ``~/.cache/metaembed/kernels``).
"""

import contextlib
import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import sys
import sysconfig
import threading
import warnings
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "maxsim_scan.cpp"
ENVIRONMENT = "METAEMBED_CPU_KERNEL"
KERNEL_DIR_ENVIRONMENT = "METAEMBED_KERNEL_DIR"
AMX_BUILD_ENVIRONMENT = "METAEMBED_KERNEL_AMX"  # "0": build without the AMX code
CHOICES = ("auto", "amx", "avx2", "torch")
# Scans reading fewer bytes than this use the torch scan in "auto" mode (and never trigger a compilation).
KERNEL_FROM_BYTES = 16 * 2**20
# AMX: bytes of packed query parts (Q * r_q * D * 6) per pass over the index. They stay in a core's L2 while the
# tiles stream the candidates; a larger batch is scanned in several passes (compute-bound there, so a re-read of
# the index costs less than missing L2 on every query tile).
AMX_PART_BYTES_PER_PASS = 2**20
# AVX2: bytes of float32 query rows per pass (Q * r_q * D * 4), for the same reason.
AVX2_ROW_BYTES_PER_PASS = 2**19
# From this many query rows in one call (Q * r_q) on, "auto" runs the torch scan instead of the AVX2 kernel
# (measured with MKL and ATen restricted to AVX2 on the AMX Xeon, N = 20,000, D = 1,024: at 512 rows the torch
# scan is 1.11x the floor, the register kernel 1.33x; at 256 rows, r_c = 16, the torch scan 1.16-1.31x across runs
# and the GEMM path below 1.22-1.31x, no clear winner; at 32 rows the register kernel 1.5x, the torch scan 2.0x).
AVX2_TORCH_FROM_ROWS = 256
# From this many query rows per pass on, the AVX2 kernel widens blocks of AVX2_GEMM_BLOCK_VECTORS candidate vectors
# (512 KB of float32 at D = 1,024: they stay in L2) into a per-thread buffer and multiplies them with a float32 GEMM
# (MKL's sgemm, the queries packed once), instead of widening in registers (measured as above: at 128 rows and
# r_c = 8, 1.21-1.27x the floor against the register kernel's 1.47x; at 32-64 rows the two are even).
AVX2_GEMM_FROM_ROWS = 128
AVX2_GEMM_BLOCK_VECTORS = 128
# What the GEMM library allocates for itself in the GEMM path (its packing buffers, per thread): measured as the
# anonymous memory that path adds beyond its own buffers, 7 MB at 128 rows and D = 512 with 2 threads.
GEMM_LIBRARY_SCRATCH_BYTES = 8 * 2**20
_GEMM_LIBRARY = 0  # 0: MKL where torch has it, 1: ATen's mm (the fallback; tests force it)
_SPLITS, _TILE_ROWS, _TILE_DIMS = 3, 16, 32
# Two-part AMX scans keep max(8, k // 8) candidates beyond k per query, re-scored with three parts (rescore_extra
# in the kernel, whose top_amx says how the top-k is certified).
AMX_RESCORE_EXTRA = 8
# Below this many query rows in a pass, two bf16 parts never need fewer B tile blocks than three (3 * 5 rows fill one
# block of 16), so no two-part scan can run and its norm bound need not be looked up.
AMX_TWO_PARTS_FROM_ROWS = 6

_lock = threading.Lock()
_state = {}  # "module": the compiled extension or None, "features": {"avx2": bool, "amx": bool}


def supported_platform() -> str | None:
    """None where the kernel can be built here (x86-64 Linux), else the reason it is not."""
    machine = platform.machine()
    if not sys.platform.startswith("linux") or machine.lower() not in ("x86_64", "amd64"):
        return f"the compiled kernel is for x86-64 Linux, and this is {sys.platform} on {machine or 'an unknown CPU'}"
    return None


def kernel_dir() -> Path:
    """Where the built kernel lives: `METAEMBED_KERNEL_DIR`, else ~/.cache/metaembed/kernels (XDG_CACHE_HOME)."""
    if os.environ.get(KERNEL_DIR_ENVIRONMENT):
        return Path(os.environ[KERNEL_DIR_ENVIRONMENT])
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "metaembed" / "kernels"


def build_flags() -> list:
    flags = ["-O3", "-fopenmp"]
    if os.environ.get(AMX_BUILD_ENVIRONMENT, "1").strip() == "0":
        flags.append("-DMETAEMBED_NO_AMX")
    return flags


def module_name(flags: list) -> str:
    """The built module's name: it changes with the source, the flags, torch and the Python ABI, so a module on disk
    under this name was built from exactly these (nothing is rebuilt or reloaded stale)."""
    inputs = [SOURCE.read_bytes(), repr((flags, torch.__version__, sysconfig.get_config_var("EXT_SUFFIX"))).encode()]
    return "metaembed_maxsim_scan_" + hashlib.sha256(b"\0".join(inputs)).hexdigest()[:16]


def ninja_folder() -> str | None:
    """A folder to put on PATH for torch's build to find ninja, or None where PATH has one: the ninja package's
    (this package depends on it), or the one beside this Python (`./run` and other callers of a venv's python that
    did not activate it leave the venv's bin folder off PATH)."""
    if shutil.which("ninja"):
        return None
    with contextlib.suppress(ImportError):
        import ninja

        if getattr(ninja, "BIN_DIR", ""):
            return str(ninja.BIN_DIR)
    beside = Path(sys.executable).parent / "ninja"
    return str(beside.parent) if beside.is_file() else None


def compiled():
    """The compiled extension, built on first call on this machine; None (with one warning) where it cannot be
    built or loaded, or (one log line) where this platform has no kernel."""
    with _lock:
        if "module" not in _state:
            _state["module"], _state["features"] = None, {"avx2": False, "amx": False}
            unsupported = supported_platform()
            if unsupported is not None:
                logger.warning("%s: searching with the pure-torch scan", unsupported)
                return None
            try:
                module = _load_or_build(build_flags())
                avx2, amx = module.cpu_features()
                _state["module"], _state["features"] = module, {"avx2": bool(avx2), "amx": bool(amx)}
            except Exception as error:  # noqa: BLE001 - any build or load failure means: use the torch scan
                reason = f"{type(error).__name__}: {str(error).strip()[-300:]}"
                warnings.warn(
                    f"the compiled CPU MaxSim scan is unavailable ({reason}); searching with the pure-torch scan",
                    stacklevel=3,
                )
    return _state["module"]


def _load_or_build(flags: list):
    """The module built with these flags: loaded from kernel_dir() where built, else built there first. One process
    builds at a time (an OS lock, released if the process dies); the module is moved into place whole, so a
    process never loads half a build."""
    import fcntl

    name = module_name(flags)
    folder = kernel_dir()
    built = folder / f"{name}.so"
    if built.is_file():
        return _import(name, built)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not built.is_file():  # (another process may have built it while this one waited)
            _build(name, flags, folder, built)
    return _import(name, built)


def _build(name: str, flags: list, folder: Path, built: Path) -> None:
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # its "no CUDA runtime" notice
    from torch.utils.cpp_extension import load

    logger.warning("compiling the CPU MaxSim kernel, once for this machine (~35 s), into %s", folder)
    build_dir = folder / f"build-{name}"
    build_dir.mkdir(exist_ok=True)
    path = os.environ.get("PATH", "")
    extra = ninja_folder()
    try:
        if extra is not None:
            os.environ["PATH"] = extra + os.pathsep + path
        load(
            name=name,
            sources=[str(SOURCE)],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            verbose=False,
        )
    finally:
        os.environ["PATH"] = path
    partial = folder / f".{name}.so.{os.getpid()}.tmp"
    shutil.copyfile(build_dir / f"{name}.so", partial)
    os.replace(partial, built)
    shutil.rmtree(build_dir, ignore_errors=True)  # (objects of a build whose name no later source will have)


def _import(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def features() -> dict:
    """{"avx2": bool, "amx": bool}: what the compiled kernels may use on this CPU (both False without them)."""
    compiled()
    return dict(_state["features"])


def choose(vectors: torch.Tensor, r_c: int, num_values: int | None = None, rows: int = 1) -> str:
    """The kernel a scan of `vectors` ([R, N, D] as stored) at candidate budget `r_c` with `rows` query rows per
    pass (Q * r_q) runs: "amx", "avx2" or "torch". `num_values` (default r_c * N * D) decides "auto" mode's size
    threshold; in "auto" mode, from AVX2_TORCH_FROM_ROWS rows on, a CPU without AMX runs the torch scan (MKL's
    GEMM outruns the AVX2 kernel where the search is compute-bound and the widening is shared by many rows)."""
    wanted = os.environ.get(ENVIRONMENT, "auto").strip().lower() or "auto"
    if wanted not in CHOICES:
        raise ValueError(f"{ENVIRONMENT} must be one of {CHOICES}, got {wanted!r}")
    if wanted == "torch" or vectors.device.type != "cpu" or vectors.dtype != torch.bfloat16 or vectors.stride(2) != 1:
        return "torch"
    dim = vectors.shape[2]
    if num_values is None:
        num_values = r_c * vectors.shape[1] * dim
    if wanted == "auto" and 2 * num_values < KERNEL_FROM_BYTES:
        return "torch"
    if compiled() is None:
        return "torch"
    usable = [
        kind for kind, divisor in (("amx", _TILE_DIMS), ("avx2", 16)) if _state["features"][kind] and dim % divisor == 0
    ]
    if wanted in usable:
        return wanted
    chosen = usable[0] if usable else "torch"
    if wanted == "auto" and chosen == "avx2" and rows >= AVX2_TORCH_FROM_ROWS:
        return "torch"
    return chosen


def amx_query_parts(queries: torch.Tensor, splits: int = _SPLITS) -> torch.Tensor:
    """[row blocks, D / 32, 16, 32] bf16: the AMX kernel's B tiles, as `top_k` packs them (in the compiled code).
    Each float32 query row ([Q, r_q, D]) is split into three bf16 parts, hi = bf16(q), mid = bf16(q - hi),
    lo = bf16(q - hi - mid) (`splits=2`: hi and mid only), which become "virtual rows" (part * rows + row: all hi
    parts, then all mid, then all lo); each tile holds 16 virtual rows x 32 dimensions, pairs of consecutive
    dimensions side by side (the VNNI layout); zero rows pad to whole (and, beyond one, an even number of) blocks."""
    return compiled().amx_query_parts(queries.reshape(-1, queries.shape[-1]).float().contiguous(), splits)


def avx2_row_group(rows: int) -> int:
    """The query rows one AVX2 micro-kernel call multiplies: 1, 2 or 3 with 3 candidates at a time, 4 with 2;
    whichever costs least for this many rows (groups of 3 run ~15% faster per row than groups of 4, measured)."""
    return rows if rows <= 2 else min((3, 4), key=lambda g: -(-rows // g) * g / (1.15 if g == 3 else 1.0))


def top_k(
    kind: str, vectors: torch.Tensor, r_c: int, count: int, queries: torch.Tensor, k: int, max_norm: float | None = None
) -> tuple | None:
    """(scores [Q, k] float32 descending, positions [Q, k] int64): the top-k by MaxSim of each query ([Q, r_q, D]
    float32) over items 0..count of `vectors` ([R, N, D] bf16 on CPU, rows contiguous) at candidate budget r_c,
    computed by the compiled kernel `kind` ("amx" or "avx2"), the top-k kept as the scan goes (no score block).
    None where a query value is not finite (the kernels' running lists assume finite scores). The queries are
    packed for the kernel in the compiled code: a single query costs one call from Python.

    `max_norm`: a bound on the L2 norm of every vector in the first r_c tiers, or None. With it, AMX passes where
    two bf16 parts per query value need fewer tiles than three (batches) run with two, certified: the same top-k
    and scores as three parts (see `top_amx` in the kernel)."""
    module = compiled()
    num_queries, r_q, dim = queries.shape
    per_pass = _queries_per_pass(kind, r_q, dim)
    found = []
    for first in range(0, num_queries, per_pass):
        part = queries[first : first + per_pass].float().contiguous()  # a copy of one pass at most (work_bytes)
        if kind == "amx":
            result = module.top_amx(vectors, r_c, count, part, k, -1.0 if max_norm is None else float(max_norm))
        elif part.shape[0] * r_q >= AVX2_GEMM_FROM_ROWS:
            result = module.top_avx2_gemm(vectors, r_c, count, part, k, _gemm_block_items(r_c), _GEMM_LIBRARY)
        else:
            result = module.top_avx2(vectors, r_c, count, part, avx2_row_group(part.shape[0] * r_q), k)
        if not result:
            return None
        found.append(result)
    if len(found) == 1:
        return found[0][0], found[0][1]
    return torch.cat([f[0] for f in found]), torch.cat([f[1] for f in found])


def _tile_blocks(virtual_rows: int) -> int:
    """B tile blocks of the AMX kernel for this many virtual rows (16 each; beyond one, an even number), as the
    kernel's part_blocks counts them."""
    blocks = -(-virtual_rows // _TILE_ROWS)
    return blocks + blocks % 2 if blocks > 1 else blocks


def _gemm_block_items(r_c: int) -> int:
    return max(1, AVX2_GEMM_BLOCK_VECTORS // r_c)


def _queries_per_pass(kind: str, r_q: int, dim: int) -> int:
    """Queries whose rows one pass over the index serves: their packed values (3 bf16 parts per value for AMX,
    float32 for AVX2) fit AMX_PART_BYTES_PER_PASS / AVX2_ROW_BYTES_PER_PASS, so they stay in L2."""
    per_pass_bytes = AMX_PART_BYTES_PER_PASS if kind == "amx" else AVX2_ROW_BYTES_PER_PASS
    value_bytes = _SPLITS * 2 if kind == "amx" else 4
    return max(1, per_pass_bytes // (value_bytes * r_q * dim))


def work_bytes(kind: str, num_queries: int, r_q: int, dim: int, k: int, r_c: int = 1) -> int:
    """An upper bound on what a `top_k` call allocates besides its result: one pass's packed queries (and the
    copies made while packing them), and per thread the running top-k lists and the block buffers (at budget r_c)."""
    per_pass = min(num_queries, _queries_per_pass(kind, r_q, dim))
    rows = per_pass * r_q
    if kind == "amx":  # a float32 copy of the queries, their three bf16 parts padded to whole (even) tile blocks
        packing = rows * dim * 4 + (_SPLITS * rows + 2 * _TILE_ROWS) * dim * 2
        block = 48 * (_SPLITS * rows + 2 * _TILE_ROWS) * 4 + 48 * rows * 4 + 48 * dim * 2 + rows * 4
    else:  # a float32 copy and the padded, permuted rows; or (GEMM) the copy, MKL's packed copy, per thread
        # the widened block, its products and the running max, and the GEMM library's own buffers
        packing = rows * dim * 4 + (rows + 3) * dim * 4
        block = 4 * (rows + 3) * 4 + rows * 4
        if rows >= AVX2_GEMM_FROM_ROWS:
            vectors = max(r_c, AVX2_GEMM_BLOCK_VECTORS)
            packing = 2 * rows * dim * 4 + 2**16 + GEMM_LIBRARY_SCRATCH_BYTES
            block = vectors * (dim + rows) * 4 + _gemm_block_items(r_c) * rows * 4
    if kind == "amx" and _tile_blocks(2 * rows) < _tile_blocks(3 * rows):
        # a two-part scan keeps more candidates, and their two- and three-part scores; the re-score's buffers per
        # thread: 48 copied rows, one query's packed parts, their products and maxima
        k += max(AMX_RESCORE_EXTRA, k // 8)
        packing += per_pass * k * 16
        virtual = _SPLITS * r_q + 2 * _TILE_ROWS
        block = max(block, 48 * dim * 2 + virtual * dim * 2 + 48 * virtual * 4 + 48 * r_q * 4)
    lists = (per_pass + 1) * max(2 * k, k + 64) * 16
    return packing + torch.get_num_threads() * (lists + block)


__all__ = ["choose", "top_k", "work_bytes", "compiled", "features", "amx_query_parts", "main"]


def main() -> int:
    """`python -m metaembed.retrieval.scan_kernel`: build the kernel now and say what this CPU runs; the exit status
    is 1 where the build failed (the warning says why)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if supported_platform() is not None:
        print(f"{supported_platform()}: searches run the pure-torch scan")
        return 0
    if compiled() is None:
        return 1
    print(
        f"kernels usable here: {features()} (built in {kernel_dir()}); a bf16 index of D = 1,024 is scanned with "
        f"{choose(torch.empty(1, 1, 1024, dtype=torch.bfloat16), 1, num_values=KERNEL_FROM_BYTES)!r}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
