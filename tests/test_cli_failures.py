"""Every CLI failure is one line and exit 2 (130 on Ctrl-C), checked before the slow work, and leaves no
file written or replaced; outputs are committed all together (property test with injected failures)."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import sensilora
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sensilora import io
from sensilora.cli import main


def allocate_args(model, out: Path, *extra) -> list[str]:
    return ["allocate", "--model", str(model), "--samples", "2", "--seq-len", "16", "--quiet", "--min-tokens", "1",
            "--output", str(out / "r.json"), "--plot", str(out / "r.png"), *extra]  # fmt: skip


def run_failing(args, capsys, message: str, code: int = 2) -> None:
    assert main(args) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def listing(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--plot", "{out}/afile/r.png"], "afile is a file, not a directory"),
        (["--output", "{out}/adir"], "is a directory"),
        (["--output", "/dev/full"], "not a regular file"),
        (["--stats", "{out}/r.json"], "are the same file"),
        (["--k-frac", "0"], r"k_frac must be in (0, 1]"),
        (["--max-rank", "2"], "max_rank=2 is below avg_rank=8"),
        (["--device", "tpu9"], "is not a torch device"),
        (["--calibration", "{out}/missing.txt"], "does not exist"),
    ],
)
def test_bad_arguments_fail_before_the_model_is_loaded(tmp_path, capsys, extra, message):
    (tmp_path / "afile").write_text("keep")
    (tmp_path / "adir").mkdir()
    before = listing(tmp_path)
    args = allocate_args(tmp_path / "no-model-here", tmp_path, *[e.format(out=tmp_path) for e in extra])
    run_failing(args, capsys, message)  # the model path does not exist: the check came first
    assert listing(tmp_path) == before and stat.S_ISCHR(os.stat("/dev/full").st_mode)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_on_a_cpu_machine(tmp_path, capsys):
    run_failing(allocate_args(tmp_path, tmp_path, "--device", "cuda"), capsys, "has no cuda device")


def test_shape_dependent_checks_run_before_calibration(tiny_model_dir, tmp_path, capsys):
    args = allocate_args(tiny_model_dir, tmp_path, "--avg-rank", "5000")
    args.remove("--quiet")  # the calibration's progress bar would show on stderr had it started
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "avg_rank=5000 exceeds" in err and "calibrating" not in err, err
    assert listing(tmp_path) == {}


def test_damaged_model_and_nan_weights_are_named(tiny_model_dir, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for item in tiny_model_dir.iterdir():
        (damaged / item.name).write_bytes(item.read_bytes())
    (damaged / "model.safetensors").write_bytes(b"\x00" * 64)
    run_failing(allocate_args(damaged, tmp_path / "out"), capsys, "cannot load a model from")
    from safetensors.torch import load_file, save_file

    weights = load_file(tiny_model_dir / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(weights, damaged / "model.safetensors", metadata={"format": "pt"})
    run_failing(allocate_args(damaged, tmp_path / "out"), capsys, "['model.layers.1.mlp.up_proj']")
    assert not (tmp_path / "out").exists()


def test_outputs_follow_symlinks_and_take_the_umask(tiny_model_dir, tmp_path, capsys):
    real = tmp_path / "real.json"
    real.write_text("old")
    (tmp_path / "link.json").symlink_to(real)
    old_mask = os.umask(0o027)
    try:
        args = allocate_args(tiny_model_dir, tmp_path / "new", "--output", str(tmp_path / "link.json"))
        assert main(args) == 0, capsys.readouterr().err
    finally:
        os.umask(old_mask)
    assert (tmp_path / "link.json").is_symlink() and json.loads(real.read_text())["format"]
    assert stat.S_IMODE((tmp_path / "new" / "r.png").stat().st_mode) == 0o640


def test_compare_refuses_a_damaged_ranks_file(tiny_model_dir, tmp_path, capsys):
    assert main(allocate_args(tiny_model_dir, tmp_path)) == 0
    data = json.loads((tmp_path / "r.json").read_text())
    del data["modules"]
    (tmp_path / "broken.json").write_text(json.dumps(data))
    capsys.readouterr()
    run_failing(["compare", str(tmp_path / "r.json"), str(tmp_path / "broken.json")], capsys, "is damaged")


def test_version_answers_without_loading_torch(capsys):
    assert main(["--version"]) == 0 and capsys.readouterr().out.strip() == f"sensilora {sensilora.__version__}"
    probe = "import sys; from sensilora.cli import main; main(['--version']); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.splitlines() == [f"sensilora {sensilora.__version__}", "False"]


@settings(max_examples=40, deadline=None)
@given(fail_at=st.integers(0, 7), existing=st.lists(st.booleans(), min_size=3, max_size=3))
def test_commit_is_all_or_nothing(tmp_path_factory, fail_at, existing):
    """A failure at any rename (made to happen at a random point) leaves the directory as it was."""
    directory = tmp_path_factory.mktemp("commit")
    targets = [directory / "a.json", directory / "sub" / "b.png", directory / "c.safetensors"]
    for target, exists in zip(targets, existing):
        if exists:
            target.parent.mkdir(exist_ok=True)
            target.write_text(f"old {target.name}")
    before = listing(directory)
    real_replace, calls = os.replace, []

    def failing_replace(src, dst):
        calls.append(dst)
        if len(calls) == fail_at + 1:
            raise OSError("disk full (injected)")
        real_replace(src, dst)

    os.replace = failing_replace
    try:
        io.commit_outputs({t: (lambda tmp, t=t: tmp.write_text(f"new {t.name}")) for t in targets})
        failed = False
    except sensilora.SensiloraError as error:  # the OSError, in one line
        assert "disk full (injected)" in str(error)
        failed = True
    finally:
        os.replace = real_replace
    if failed:
        assert listing(directory) == before
        assert not (directory / "sub").exists() or existing[1]
    else:
        assert {Path(k).name: v for k, v in listing(directory).items()} == {
            t.name: f"new {t.name}".encode() for t in targets
        }


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("a.jsonl", '{"text": "fine"}\n{"body": "no text field"}\n', "a.jsonl:2 has no string field 'text'"),
        ("a.json", '{"text": "an object, not a list"}', "holds a JSON dict"),
        ("a.json", "[1, 2", "is not valid JSON"),
        ("blank.txt", "   \n\t\n", "empty after tokenization"),
        ("one.txt", "x", "fewer than the 2048 that give stable ranks"),
    ],
)
def test_calibration_text_is_read_strictly(tiny_model_dir, tmp_path, capsys, name, content, message):
    (tmp_path / name).write_text(content)
    args = allocate_args(
        tiny_model_dir, tmp_path / "out", "--calibration", str(tmp_path / name), "--min-tokens", "2048",
        "--samples", "128",
    )  # fmt: skip
    run_failing(args, capsys, message)
    assert not (tmp_path / "out").exists()


def test_text_field_short_text_warning_and_seq_len_floor(tiny_model_dir, tmp_path, capsys):
    records = [json.dumps({"body": f"verse {i} " * 40}) for i in range(60)]
    (tmp_path / "c.jsonl").write_text("\n".join(records))
    base = allocate_args(
        tiny_model_dir, tmp_path / "out", "--calibration", str(tmp_path / "c.jsonl"), "--samples", "400"
    )
    assert main([*base, "--text-field", "body", "--seq-len", "64", "--min-tokens", "64"]) == 0
    err = capsys.readouterr().err
    assert "warning: the calibration text gives" in err and "of the 25600 tokens asked for" in err
    run_failing([*base, "--text-field", "body", "--seq-len", "1"], capsys, "--seq-len 1 is below 16")


def test_allocate_from_saved_statistics(tiny_model_dir, tmp_path, capsys):
    stats = tmp_path / "stats.safetensors"
    assert main([*allocate_args(tiny_model_dir, tmp_path, "--min-tokens", "1"), "--stats", str(stats)]) == 0
    first = json.loads((tmp_path / "r.json").read_text())
    again = ["allocate", "--from-stats", str(stats), "--quiet", "--output", str(tmp_path / "again.json"),
             "--plot", str(tmp_path / "again.png"), "--model", str(tmp_path / "never-loaded")]  # fmt: skip
    assert main(again) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "again.json").read_text())["modules"] == first["modules"]
    obs_stats = tmp_path / "obs.safetensors"
    args = allocate_args(
        tiny_model_dir, tmp_path / "obs", "--min-tokens", "1", "--mode", "obs", "--stats", str(obs_stats)
    )
    assert main(args) == 0
    capsys.readouterr()
    no_model = [
        "allocate",
        "--from-stats",
        str(obs_stats),
        "--output",
        str(tmp_path / "x.json"),
        "--plot",
        str(tmp_path / "x.png"),
    ]
    run_failing(no_model, capsys, "obs-mode statistics: the saliencies need the model's weights; pass --model DIR")


def test_hub_names_fail_at_once_offline(tiny_model_dir, tmp_path, capsys):
    """No network here (nor in CI): hub ids and hub dataset names fail with one line that says what to do."""
    run_failing(allocate_args("HuggingFaceTB/SmolLM2-135M", tmp_path), capsys, "pass its local directory")
    args = allocate_args(tiny_model_dir, tmp_path, "--calibration", "wikitext:wikitext-2-raw-v1:train:text")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ("pip install datasets" in err or "pass the local path" in err), err
