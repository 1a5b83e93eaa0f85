"""Dispatch through torch's dispatcher: the op table, the kernel choice, plugin loading and its failures,
and the architecture's import graph (no cycles; the library never imports the kernels)."""

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from sensilora import allocate, calibrate, ops
from sensilora.errors import BackendUnavailableError
from sensilora.ops import reference

from tests.models import random_batches, tiny_gpt2, tiny_llama

ROOT = Path(__file__).resolve().parent.parent
triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402

from sensilora_kernels.registry import CPU_PREFERENCE, PREFERENCE, available_kernels, choose, use_backend  # noqa: E402
from sensilora_kernels.triton_backend import gram  # noqa: E402  (conftest set TRITON_INTERPRET before this import)

ALL_OPS = {name: object() for name in ops.OP_NAMES}


def has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"sensilora::{op}", key)


def test_the_preference_table_names_every_op():
    assert set(PREFERENCE) == set(ops.OP_NAMES)
    assert all(reason for _, reason in PREFERENCE.values())


def test_the_kernel_is_chosen_by_the_table_or_forced():
    cuda_ops = {op: object() for op in ("column_sumsq_", "topk_mean_and_effective_rank")}
    both = {"triton": ALL_OPS, "cuda": cuda_ops}
    assert choose("column_sumsq_", both, None)[0] == "triton"
    assert choose("topk_mean_and_effective_rank", both, None)[0] == "cuda"
    fallback = choose("column_sumsq_", {"cuda": cuda_ops}, None)
    assert fallback[0] == "cuda" and "triton is preferred but not loaded" in fallback[1]
    # Triton's selection is bound below torch.sort's: without the extension the sort reference serves it,
    # unless forced
    assert choose("topk_mean_and_effective_rank", {"triton": ALL_OPS}, None) is None
    assert choose("topk_mean_and_effective_rank", {"triton": ALL_OPS}, "triton")[0] == "triton"
    assert choose("column_sumsq_", both, "cuda") == ("cuda", "forced by SENSILORA_BACKEND=cuda")
    assert choose("gram_", both, "cuda") is None  # the forced backend lacks it: the reference serves it
    assert choose("gram_", {}, None) is None


def test_cuda_tensors_reach_the_registered_kernels_cpu_tensors_the_cpu_table():
    ops.load_backends()
    kernels, _ = available_kernels()
    for op in ops.OP_NAMES:  # CUDA: a kernel wherever a loaded backend is in the op's table
        assert has_kernel(op, "CUDA") == any(op in kernels.get(name, {}) for name in PREFERENCE[op][0]), op
        assert has_kernel(op, "CPU") == (op in CPU_PREFERENCE), op  # the others: the torch reference
    rows = {(row["op"], row["device"]): row for row in ops.backend_report()}
    assert rows[("gram_", "cuda")]["backend"] == "triton"
    assert rows[("gram_", "cpu")]["backend"] == "torch"
    assert rows[("saliency_topk_mean_and_effective_rank", "cpu")]["backend"] == "cpu"
    values, offsets = torch.rand(1000), torch.tensor([0, 400, 1000])
    torch.testing.assert_close(  # what the dispatcher runs on CPU tensors equals the sorted reference
        ops.topk_mean_and_effective_rank(values, offsets, None, 0.5, 0.85),
        reference.topk_mean_and_effective_rank(values, offsets, None, 0.5, 0.85), rtol=1e-12, atol=0,
    )  # fmt: skip


def test_cpu_choices_never_take_gpu_backends():
    everything = {"triton": ALL_OPS, "cuda": ALL_OPS, "cpu": ALL_OPS}
    assert choose("topk_mean_and_effective_rank", everything, None, "cpu")[0] == "cpu"
    assert choose("gram_", everything, None, "cpu") is None
    assert choose("topk_mean_and_effective_rank", everything, "cuda", "cpu") is None
    assert choose("topk_mean_and_effective_rank", everything, "cpu", "cuda") is None


def test_use_backend_is_scoped():
    with use_backend("triton", "cpu") as report:
        assert has_kernel("column_sumsq_", "CPU")
        assert report["kernels"]["gram_"]["cpu"][0] == "triton"
    assert not has_kernel("column_sumsq_", "CPU")


def test_invalid_forced_backend_is_refused(monkeypatch):
    monkeypatch.setenv("SENSILORA_BACKEND", "fortran")
    with pytest.raises(BackendUnavailableError, match="not a backend"):
        ops.forced_backend()


@pytest.mark.interpreter
@pytest.mark.parametrize("builder,mode", [(tiny_llama, "diag"), (tiny_llama, "obs"), (tiny_gpt2, "obs")])
def test_calibration_through_triton_gives_the_same_allocation(builder, mode):
    model = builder()
    expected = allocate(calibrate(model, random_batches(), mode=mode, progress=False), avg_rank=4, model=model)
    with use_backend("triton", "cpu"):
        got = allocate(calibrate(model, random_batches(), mode=mode, progress=False), avg_rank=4, model=model)
    assert got.ranks == expected.ranks
    for name, metrics in expected.metrics.items():
        assert got.metrics[name].effective_rank == metrics.effective_rank
        assert got.metrics[name].global_sensitivity == pytest.approx(metrics.global_sensitivity, rel=1e-4)


@triton.jit
def _row_pointers_probe(out_ptr, base_ptr, rows_ptr, d, N: tl.constexpr):
    index = tl.arange(0, N)
    pointers = gram._row_pointers(base_ptr, tl.load(rows_ptr + index), d)
    tl.store(out_ptr + index, pointers.to(tl.int64) - base_ptr.to(tl.int64))  # byte offsets


@pytest.mark.interpreter
def test_gram_row_offsets_are_64_bit_past_46341_columns():
    rows = torch.tensor([0, 46340, 46341, 59999], dtype=torch.int32)
    out = torch.zeros(4, dtype=torch.int64)
    _row_pointers_probe[(1,)](out, torch.zeros(1), rows, 60000, N=4)
    assert torch.equal(out, rows.long() * 60000 * 4) and int(out.max()) > 2**33


def run_python(code: str, extra_path: Path | None = None, **env_changes) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SENSILORA_BACKEND")}
    env.update(env_changes)
    code = textwrap.dedent(code)
    if extra_path is not None:  # shadow installed packages with the simulated ones, ahead of the checkout
        code = f"import sys; sys.path.insert(0, {str(extra_path)!r})\n" + code
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


CALIBRATE_ON_CPU = """
    import warnings
    warnings.simplefilter("always")
    import torch, sensilora
    from tests.models import random_batches, tiny_llama
    stats = sensilora.calibrate(tiny_llama(), random_batches(), progress=False)
    print("calibrated", stats.info["tokens"])
"""


def test_a_broken_kernel_package_warns_once_and_the_library_works(tmp_path):
    broken = tmp_path / "sensilora_kernels"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('simulated breakage')\n")
    result = run_python(CALIBRATE_ON_CPU, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "calibrated" in result.stdout
    assert result.stderr.count("failed to load") == 1 and "simulated breakage" in result.stderr
    env = run_python("from sensilora.cli import main; main(['env'])", tmp_path)
    assert env.returncode == 0 and "FAILED to load: ImportError: simulated breakage" in env.stdout


def test_without_triton_the_library_and_the_cuda_backend_still_load(tmp_path):
    fake = tmp_path / "triton"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('No module named triton (simulated)')\n")
    result = run_python(
        """
        import sensilora_kernels, sensilora_kernels.cuda as cuda
        print(sensilora_kernels.register()["notes"])
        print("cuda module loaded; extension available:", cuda.AVAILABLE)
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "triton backend off" in result.stdout and "cuda module loaded" in result.stdout
    calibrated = run_python(CALIBRATE_ON_CPU, tmp_path)
    assert calibrated.returncode == 0 and "calibrated" in calibrated.stdout, calibrated.stderr[-2000:]
    assert "failed to load" not in calibrated.stderr  # a missing optional dependency is not a failure


def test_forcing_torch_skips_the_plugins():
    result = run_python("from sensilora.cli import main; main(['env'])", SENSILORA_BACKEND="torch")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "triton" not in result.stdout.split("SENSILORA_BACKEND: torch", 1)[1].replace("triton not", "")


# ----------------------------------------------------------------------------------------------
# The architecture: module import graph of the two packages.


def import_graph() -> dict[str, set[str]]:
    """module -> the package-internal modules it imports (at any depth of its code)."""
    roots = {"sensilora": ROOT / "python" / "sensilora", "sensilora_kernels": ROOT / "sensilora_kernels"}
    modules = {}
    for package, directory in roots.items():
        for path in directory.rglob("*.py"):
            parts = path.relative_to(directory).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            modules[name] = path
    graph = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        base = name if is_package else name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                anchor = base
                for _ in range(max(node.level - 1, 0)):
                    anchor = anchor.rsplit(".", 1)[0]
                if node.level and not node.module:  # from . import x: the submodule x, not the package
                    candidates = [f"{anchor}.{alias.name}" for alias in node.names]
                else:
                    target = f"{anchor}.{node.module}" if node.level else node.module
                    candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            found.update(c for c in candidates if c in modules and c != name)
        graph[name] = found
    return graph


def test_no_import_cycles_and_the_library_never_imports_the_kernels():
    graph = import_graph()
    assert not [
        m
        for m, deps in graph.items()
        if m.startswith("sensilora.") or m == "sensilora"
        for d in deps
        if d.startswith("sensilora_kernels")
    ]
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dependency in graph[module]:
            if state.get(dependency) == 1:
                pytest.fail(f"import cycle: {' -> '.join(path[path.index(dependency) :] + [dependency])}")
            if dependency not in state:
                visit(dependency, path + [dependency])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])


# The flow, lowest first: a module may import its own layer and those below it, never one above.
LAYERS = ("ops", "calibration", "allocation", "integrations", "cli")


def layer(module: str) -> int:
    """sensilora.errors/io/version and ops: 0; calibration 1; allocation 2; integrations 3; cli and
    __main__ 4; the package facade (sensilora itself) above them all."""
    if module == "sensilora":
        return len(LAYERS)
    part = module.split(".")[1]
    return LAYERS.index(part) if part in LAYERS else (LAYERS.index("cli") if part == "__main__" else 0)


def test_every_import_goes_down_the_flow():
    graph = import_graph()
    upward = [
        f"{module} -> {dependency}"
        for module, dependencies in graph.items()
        if module.startswith("sensilora.")
        for dependency in dependencies
        if dependency.startswith("sensilora") and not dependency.startswith("sensilora_kernels")
        and layer(dependency) > layer(module)
    ]  # fmt: skip
    assert not upward, upward
    assert {path.name for path in (ROOT / "python" / "sensilora").iterdir() if path.is_dir()} >= set(LAYERS)


def test_no_module_over_300_lines():
    for directory in (ROOT / "python" / "sensilora", ROOT / "sensilora_kernels"):
        for path in directory.rglob("*.py"):
            assert len(path.read_text().splitlines()) <= 300, path
