"""The fault and bad-input audit, kept as tests: every bad input to every command ends in exit 2 and one line
on stderr that names the problem, with no traceback and nothing written or left behind (the working
directory and every input are as they were). The cases are built from tables: damaged ranks files for each
command that reads one, damaged statistics files for each that reads those, bad option values, bad paths."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from sensilora.cli import main

TEXT = "In the beginning God created the heaven and the earth. And the earth was without form, and void. "


@pytest.fixture(scope="module")
def workspace(tiny_model_dir, tmp_path_factory):
    """Valid inputs made once: calibration text, a ranks file, diag statistics (``root``)."""
    root = tmp_path_factory.mktemp("audit")
    (root / "text.txt").write_text(TEXT * 200, encoding="utf-8")
    args = ["allocate", "--model", str(tiny_model_dir), "--calibration", str(root / "text.txt"), "--samples", "8",
            "--seq-len", "32", "--min-tokens", "1", "--quiet", "--output", str(root / "ranks.json"),
            "--plot", str(root / "ranks.png"), "--stats", str(root / "stats.safetensors")]  # fmt: skip
    assert main(args) == 0
    (root / "other.json").write_bytes((root / "ranks.json").read_bytes())
    return {"root": root, "model": tiny_model_dir}


def listing(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else b"" for p in directory.rglob("*")}


def run_case(argv: list[str], message: str, capsys, monkeypatch, case_dir: Path, workspace) -> None:
    monkeypatch.chdir(case_dir)  # default outputs (sensilora-out/...) would land here
    before = (listing(case_dir), listing(workspace["root"]))
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, (code, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert message.lower() in err.lower(), err
    assert (listing(case_dir), listing(workspace["root"])) == before, "something was written or left behind"


# ---------------------------------------------------------------- damaged ranks files, for each reader
def _ranks_with(change):
    def damage(text: str) -> bytes:
        data = json.loads(text)
        change(data)
        return json.dumps(data).encode()

    return damage


def _first_module(data: dict) -> dict:
    return next(iter(data["modules"].values()))


RANKS_DAMAGE = {
    "empty": (lambda t: b"", "cannot read ranks file"),
    "binary": (lambda t: bytes(range(256)) * 4, "cannot read ranks file"),
    "truncated": (lambda t: t[: len(t) // 2].encode(), "cannot read ranks file"),
    "not-an-object": (lambda t: b"[1, 2, 3]", "is not a sensilora ranks file"),
    "deeply-nested": (lambda t: b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    "nan-constant": (lambda t: t.replace('"rank": ', '"rank": NaN, "x": ', 1).encode(), "NaN is not a number"),
    "infinity-constant": (lambda t: t.replace('"theta": ', '"theta": -Infinity, "x": ', 1).encode(), "Infinity"),
    "foreign-format": (_ranks_with(lambda d: d.update(format="something/1")), "is not a sensilora ranks file"),
    "no-modules-key": (_ranks_with(lambda d: d.pop("modules")), "damaged"),
    "no-config": (_ranks_with(lambda d: d.pop("config")), "damaged"),
    "modules-empty": (_ranks_with(lambda d: d.update(modules={})), "lists no modules"),
    "modules-a-list": (_ranks_with(lambda d: d.update(modules=[1])), "lists no modules"),
    "rank-negative": (_ranks_with(lambda d: _first_module(d).update(rank=-3)), "a rank is an integer"),
    "rank-zero": (_ranks_with(lambda d: _first_module(d).update(rank=0)), "a rank is an integer"),
    "rank-fraction": (_ranks_with(lambda d: _first_module(d).update(rank=3.7)), "a rank is an integer"),
    "rank-huge": (_ranks_with(lambda d: _first_module(d).update(rank=100000)), "a rank is an integer"),
    "rank-string": (_ranks_with(lambda d: _first_module(d).update(rank="4")), "a rank is an integer"),
    "rank-bool": (_ranks_with(lambda d: _first_module(d).update(rank=True)), "a rank is an integer"),
    "shape-zero": (_ranks_with(lambda d: _first_module(d).update(shape=[0, 32])), "not [d_out, d_in]"),
    "shape-three": (_ranks_with(lambda d: _first_module(d).update(shape=[32, 32, 1])), "not [d_out, d_in]"),
    "shape-missing": (_ranks_with(lambda d: _first_module(d).pop("shape")), "not [d_out, d_in]"),
    "theta-overflow": (lambda t: t.replace('"theta": ', '"theta": 1e400, "x": ', 1).encode(), "no finite theta"),
    "metric-null": (_ranks_with(lambda d: _first_module(d).update(topk=None)), "no finite topk"),
    "config-bad": (_ranks_with(lambda d: d["config"].update(avg_rank=0)), "avg_rank must be a positive integer"),
    "latin-1": (lambda t: t.replace('"format"', '"f\u00f6rmat"').encode("latin-1"), "cannot read ranks file"),
}


def _ranks_readers(bad: str, ws: dict, out: Path) -> dict[str, list[str]]:
    good = str(ws["root"] / "other.json")
    return {
        "report": ["report", bad, "-o", str(out / "report.png")],
        "compare-first": ["compare", bad, good],
        "compare-second": ["compare", good, bad],
        "export-json": ["export", bad, str(out / "config.json"), "--to", "json"],
        "export-axolotl": ["export", bad, str(out / "axolotl.yml"), "--to", "axolotl"],
        "export-peft": ["export", bad, str(out / "adapter"), "--to", "peft", "--model", str(ws["model"])],
    }


READERS = ["report", "compare-first", "compare-second", "export-json", "export-axolotl", "export-peft"]


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("damage", sorted(RANKS_DAMAGE))
def test_damaged_ranks_files(workspace, tmp_path, capsys, monkeypatch, reader, damage):
    make, message = RANKS_DAMAGE[damage]
    bad = tmp_path / "bad.json"
    bad.write_bytes(make((workspace["root"] / "ranks.json").read_text()))
    argv = _ranks_readers(str(bad), workspace, tmp_path / "out")[reader]
    run_case(argv, message, capsys, monkeypatch, tmp_path, workspace)


def _special_path(kind: str, directory: Path) -> Path:
    path = directory / f"{kind}.json"
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    return path  # "missing": nothing there


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("kind,message", [("missing", "no such file"), ("directory", "is a directory")])
def test_ranks_paths_that_are_no_file(workspace, tmp_path, capsys, monkeypatch, reader, kind, message):
    bad = _special_path(kind, tmp_path)
    run_case(_ranks_readers(str(bad), workspace, tmp_path / "out")[reader], message, capsys, monkeypatch, tmp_path,
             workspace)  # fmt: skip


# ------------------------------------------------------------ damaged statistics files, for each reader
def _rewrite_stats(source: Path, target: Path, tensors=None, header=None) -> None:
    with safe_open(str(source), framework="pt") as handle:
        metadata = handle.metadata()
        values = {key: handle.get_tensor(key) for key in handle.keys()}
    data = json.loads(metadata["sensilora"])
    if tensors:
        tensors(values)
    if header:
        header(data)
    save_file(values, str(target), metadata={"sensilora": json.dumps(data)})


def _scale_first(value: float):
    def change(values: dict) -> None:
        key = sorted(k for k in values if k.endswith("hessian_diag"))[0]
        values[key] = values[key].clone()
        values[key][0] = value

    return change


def _shorten_first(values: dict) -> None:
    key = sorted(k for k in values if k.endswith("hessian_diag"))[0]
    values[key] = values[key][:-1].clone()


STATS_DAMAGE = {
    "empty": (lambda s, t: t.write_bytes(b""), "cannot read statistics file"),
    "garbage": (lambda s, t: t.write_bytes(bytes(range(256)) * 8), "cannot read statistics file"),
    "truncated": (lambda s, t: t.write_bytes(s.read_bytes()[:100]), "cannot read statistics file"),
    "foreign": (lambda s, t: save_file({"w": torch.zeros(2)}, str(t)), "not a sensilora statistics file"),
    "wrong-format": (lambda s, t: _rewrite_stats(s, t, header=lambda h: h.update(format="x/1")), "of format"),
    "mode-bogus": (lambda s, t: _rewrite_stats(s, t, header=lambda h: h.update(mode="bogus")), "damaged"),
    "no-modules": (lambda s, t: _rewrite_stats(s, t, header=lambda h: h.update(modules={})), "lists no modules"),
    "tokens-zero": (
        lambda s, t: _rewrite_stats(s, t, header=lambda h: h["inputs"][0].update(num_tokens=0)),
        "not a positive integer",
    ),
    "diag-too-short": (lambda s, t: _rewrite_stats(s, t, tensors=_shorten_first), "the file is damaged"),
    "diag-nan": (lambda s, t: _rewrite_stats(s, t, tensors=_scale_first(float("nan"))), "NaN/Inf or negative"),
    "diag-inf": (lambda s, t: _rewrite_stats(s, t, tensors=_scale_first(float("inf"))), "NaN/Inf or negative"),
    "diag-negative": (lambda s, t: _rewrite_stats(s, t, tensors=_scale_first(-1.0)), "NaN/Inf or negative"),
}


@pytest.mark.parametrize("reader", ["allocate", "merge-first", "merge-second"])
@pytest.mark.parametrize("damage", sorted(STATS_DAMAGE))
def test_damaged_statistics_files(workspace, tmp_path, capsys, monkeypatch, reader, damage):
    make, message = STATS_DAMAGE[damage]
    bad, good = tmp_path / "bad.safetensors", workspace["root"] / "stats.safetensors"
    make(good, bad)
    out = tmp_path / "out"
    argv = {
        "allocate": [
            "allocate",
            "--from-stats",
            str(bad),
            "--output",
            str(out / "r.json"),
            "--plot",
            str(out / "r.png"),
            "--quiet",
        ],  # fmt: skip
        "merge-first": ["merge", str(bad), str(good), "-o", str(out / "m.safetensors")],
        "merge-second": ["merge", str(good), str(bad), "-o", str(out / "m.safetensors")],
    }[reader]
    run_case(argv, message, capsys, monkeypatch, tmp_path, workspace)


# ------------------------------------------------------------------- allocate: bad options and inputs
def _allocate(ws: dict, out: Path, *extra: str) -> list[str]:
    return ["allocate", "--model", str(ws["model"]), "--calibration", str(ws["root"] / "text.txt"), "--samples",
            "8", "--seq-len", "32", "--min-tokens", "1", "--quiet", "--output", str(out / "r.json"), "--plot",
            str(out / "r.png"), *extra]  # fmt: skip


BAD_OPTIONS = [
    (["--samples", "0"], "--samples 0 is below 1"),
    (["--samples", "-5"], "--samples -5 is below 1"),
    (["--samples", "x"], "invalid int value"),
    (["--samples", "1.5"], "invalid int value"),
    (["--batch-size", "0"], "--batch-size 0 is below 1"),
    (["--batch-size", "-2"], "--batch-size -2 is below 1"),
    (["--seq-len", "0"], "--seq-len 0 is below 16"),
    (["--seq-len", "8"], "--seq-len 8 is below 16"),
    (["--seq-len", "256"], "exceeds the model's context of 128"),
    (["--seq-len", "10000000"], "exceeds the model's context of 128"),
    (["--min-tokens", "-1"], "--min-tokens -1 is below 0"),
    (["--min-tokens", "100000"], "fewer than --min-tokens 100000"),
    (["--avg-rank", "0"], "avg_rank must be a positive integer"),
    (["--avg-rank", "-4"], "avg_rank must be a positive integer"),
    (["--avg-rank", "four"], "invalid int value"),
    (["--avg-rank", "100000"], "avg_rank"),
    (["--k-frac", "0"], "k_frac must be in"),
    (["--k-frac", "1.5"], "k_frac must be in"),
    (["--k-frac", "nan"], "k_frac must be in"),
    (["--k-frac", "-1"], "k_frac must be in"),
    (["--alpha", "0"], "alpha must be in"),
    (["--alpha", "1.5"], "alpha must be in"),
    (["--alpha", "nan"], "alpha must be in"),
    (["--alpha", "inf"], "alpha must be in"),
    (["--min-rank", "0"], "min_rank must be an integer >= 1"),
    (["--min-rank", "9"], "min_rank=9 exceeds avg_rank=8"),
    (["--max-rank", "4"], "max_rank=4 is below avg_rank=8"),
    (["--max-rank", "0"], "max_rank"),
    (["--temperature", "-1"], "temperature"),
    (["--temperature", "nan"], "temperature"),
    (["--temperature", "inf"], "temperature"),
    (["--rank-multiple", "0"], "rank_multiple"),
    (["--rank-multiple", "-2"], "rank_multiple"),
    (["--exclude-first", "-1"], "exclude_first must be a non-negative integer"),
    (["--exclude-first", "32"], "--exclude-first 32 leaves no token"),
    (["--exclude-first", "1000"], "--exclude-first 1000 leaves no token"),
    (["--checkpoint-every", "0"], "checkpoint_every must be a positive number"),
    (["--method", "adalora"], "invalid choice"),
    (["--mode", "full"], "invalid choice"),
    (["--metrics", "all"], "invalid choice"),
    (["--weighting", "cv2"], "invalid choice"),
    (["--budget", "flops"], "invalid choice"),
    (["--aggregation", "mean"], "invalid choice"),
    (["--rule", "magic"], "invalid choice"),
    (["--pooling", "layer"], "invalid choice"),
    (["--rule", "gora", "--method", "pra", "--budget", "ranks"], "use it with method='sra'"),
    (["--rule", "gradient-spectrum", "--pooling", "type-depth"], "pooling='none'"),
    (["--rule", "gora", "--sequential"], "computes the mean gradients in one process: drop --sequential"),
    (["--statistic", "gradient"], "invalid choice"),
    (["--dtype", "int8"], "invalid choice"),
    (["--method", "pra", "--budget", "params"], "use budget='ranks' with method='pra'"),
    (["--keep-grams"], "keep_grams keeps obs mode's"),
    (["--device", "cuda:7"], "--device cuda:7"),
    (["--device", "bogus"], "is not a torch device"),
    (["--device", "cuda"], "--device cuda"),
    (["--device", ""], "--device"),
    (["--target-modules", "no_such_proj"], "no module of LlamaForCausalLM matches"),
    (["--target-modules", "[unclosed"], "'[unclosed' is not a valid regex"),
    (["--unknown-option"], "unrecognized arguments"),
    (["--samples"], "expected one argument"),
    (["positional"], "unrecognized arguments"),
]


@pytest.mark.parametrize("extra,message", BAD_OPTIONS, ids=[" ".join(e) for e, _ in BAD_OPTIONS])
def test_bad_allocate_options(workspace, tmp_path, capsys, monkeypatch, extra, message):
    argv = _allocate(workspace, tmp_path / "out", *extra)
    if message in ("invalid int value", "invalid choice", "unrecognized arguments", "expected one argument"):
        with pytest.raises(SystemExit) as stop:  # argparse's own exit, one line (OneLineParser)
            run_case(argv, message, capsys, monkeypatch, tmp_path, workspace)
        assert stop.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
        return
    run_case(argv, message, capsys, monkeypatch, tmp_path, workspace)


def _calibration_input(kind: str, directory: Path) -> tuple[str, str]:
    """(path, expected message) of bad calibration text of ``kind``."""
    path = directory / "text"
    if kind == "missing":
        return str(path), "does not exist"
    if kind == "fifo":
        os.mkfifo(path)
        return str(path), "not a regular file"
    if kind == "empty-dir":
        path.mkdir()
        return str(path), "holds no .txt files"
    if kind in ("binary-in-dir", "latin-1-in-dir"):
        path.mkdir()
        (path / "a.txt").write_text(TEXT * 50)
        (path / "b.txt").write_bytes(
            b"\x00\x01\x02" * 100 if kind == "binary-in-dir" else "caf\u00e9".encode("latin-1")
        )
        return str(path), "binary" if kind == "binary-in-dir" else "not UTF-8"
    contents = {
        "nul.txt": (b"\x00" * 5000, "holds NUL bytes"),
        "latin-1.txt": ("caf\u00e9 ".encode("latin-1") * 100, "is not UTF-8"),
        "blank.txt": (b"  \n\t\n", "empty after tokenization"),
        "bad-line.jsonl": (b'{"text": "fine"}\n{oops\n', "is not valid JSON"),
        "no-field.jsonl": (b'{"body": "x"}\n', "has no string field 'text'"),
        "deep.jsonl": (b"[" * 100_000 + b"]" * 100_000 + b"\n", "is not valid JSON"),
        "dict.json": (b'{"text": "one"}', "holds a JSON dict"),
        "broken.json": (b"[1, 2", "is not valid JSON"),
        "numbers.json": (b"[1, 2]", "has no string field"),
    }
    data, message = contents[kind]
    path = directory / kind
    path.write_bytes(data)
    return str(path), message


CALIBRATION_KINDS = ["missing", "fifo", "empty-dir", "binary-in-dir", "latin-1-in-dir", "nul.txt", "latin-1.txt",
                     "blank.txt", "bad-line.jsonl", "no-field.jsonl", "deep.jsonl", "dict.json", "broken.json",
                     "numbers.json"]  # fmt: skip


@pytest.mark.parametrize("kind", CALIBRATION_KINDS)
def test_bad_calibration_text(workspace, tmp_path, capsys, monkeypatch, kind):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    path, message = _calibration_input(kind, inputs)
    argv = _allocate(workspace, tmp_path / "out", "--calibration", path)
    run_case(argv, message, capsys, monkeypatch, tmp_path, workspace)


def _model_input(kind: str, directory: Path, workspace) -> tuple[str, str]:
    path = directory / "model"
    if kind == "missing":
        return str(path), "is not a directory"
    if kind == "a-file":
        path.write_text("not a model")
        return str(path), "is not a directory"
    path.mkdir()
    if kind == "empty-dir":
        return str(path), "neither config.json nor a .gguf file"
    for item in workspace["model"].iterdir():
        shutil.copy(item, path / item.name)
    if kind == "bad-config":
        (path / "config.json").write_text("{oops")
        return str(path), "config.json is not valid JSON"
    if kind == "zero-weights":
        (path / "model.safetensors").write_bytes(b"\x00" * 64)
        return str(path), "cannot load a model from"
    if kind == "no-tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (path / name).unlink(missing_ok=True)
        return str(path), "has no usable tokenizer"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing", "a-file", "empty-dir", "bad-config", "zero-weights", "no-tokenizer"])
def test_bad_model_directories(workspace, tmp_path, capsys, monkeypatch, kind):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    path, message = _model_input(kind, inputs, workspace)
    argv = _allocate(workspace, tmp_path / "out", "--model", path)
    run_case(argv, message, capsys, monkeypatch, tmp_path, workspace)


def _output_case(kind: str, ws: dict, case: Path) -> tuple[list[str], str]:
    out = case / "out"
    if kind == "output-is-dir":
        (case / "taken").mkdir()
        return _allocate(ws, out, "--output", str(case / "taken")), "is a directory"
    if kind == "parent-is-file":
        (case / "file").write_text("x")
        return _allocate(ws, out, "--output", str(case / "file" / "r.json")), "is a file, not a directory"
    if kind == "plot-equals-output":
        return _allocate(ws, out, "--plot", str(out / "r.json")), "are the same file"
    if kind == "stats-equals-output":
        return _allocate(ws, out, "--stats", str(out / "r.json")), "are the same file"
    if kind == "output-is-fifo":
        os.mkfifo(case / "fifo")
        return _allocate(ws, out, "--output", str(case / "fifo")), "not a regular file"
    if kind == "checkpoint-is-dir":
        (case / "ckpt").mkdir()
        return _allocate(ws, out, "--checkpoint", str(case / "ckpt")), "is a directory"
    if kind == "checkpoint-with-sequential":
        return _allocate(ws, out, "--checkpoint", str(case / "c"), "--sequential"), "sequential mode runs layer"
    stats = str(ws["root"] / "stats.safetensors")
    from_stats = ["allocate", "--from-stats", stats, "--quiet", "--output", str(out / "r.json"), "--plot",
                  str(out / "r.png")]  # fmt: skip
    ignored = {"from-stats-mode": ["--mode", "diag"], "from-stats-stats": ["--stats", str(out / "s")],
               "from-stats-calibration": ["--calibration", "x.txt"], "from-stats-statistic": ["--statistic", "fisher"],
               "from-stats-sequential": ["--sequential"], "from-stats-checkpoint": ["--checkpoint", "c"]}  # fmt: skip
    return [*from_stats, *ignored[kind]], "only when calibrating"


OUTPUT_KINDS = ["output-is-dir", "parent-is-file", "plot-equals-output", "stats-equals-output", "output-is-fifo",
                "checkpoint-is-dir", "checkpoint-with-sequential", "from-stats-mode", "from-stats-stats",
                "from-stats-calibration", "from-stats-statistic", "from-stats-sequential",
                "from-stats-checkpoint"]  # fmt: skip


@pytest.mark.parametrize("kind", OUTPUT_KINDS)
def test_bad_output_paths_and_option_mixes(workspace, tmp_path, capsys, monkeypatch, kind):
    argv, message = _output_case(kind, workspace, tmp_path)
    run_case(argv, message, capsys, monkeypatch, tmp_path, workspace)


def test_bad_backend_is_refused_before_the_model_loads(workspace, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SENSILORA_BACKEND", "bogus")
    argv = _allocate(workspace, tmp_path / "out", "--model", str(tmp_path / "never-loaded"))
    run_case(argv, "SENSILORA_BACKEND='bogus' is not a backend", capsys, monkeypatch, tmp_path, workspace)


# ------------------------------------------------------------------ export, merge: bad options and targets
EXPORT_CASES = [
    (["--lora-alpha", "nan"], "lora_alpha must be a finite positive number"),
    (["--lora-alpha", "inf"], "lora_alpha must be a finite positive number"),
    (["--lora-alpha", "-16"], "lora_alpha must be a finite positive number"),
    (["--lora-alpha", "0"], "lora_alpha must be a finite positive number"),
    (["--lora-dropout", "5"], "lora_dropout is a probability in [0, 1)"),
    (["--lora-dropout", "-0.1"], "lora_dropout is a probability in [0, 1)"),
    (["--lora-dropout", "1"], "lora_dropout is a probability in [0, 1)"),
    (["--lora-dropout", "nan"], "lora_dropout is a probability in [0, 1)"),
]


@pytest.mark.parametrize("to", ["peft", "json"])
@pytest.mark.parametrize("extra,message", EXPORT_CASES, ids=[" ".join(e) for e, _ in EXPORT_CASES])
def test_bad_export_options(workspace, tmp_path, capsys, monkeypatch, to, extra, message):
    out = tmp_path / ("adapter" if to == "peft" else "config.json")
    argv = ["export", str(workspace["root"] / "ranks.json"), str(out), "--to", to,
            "--model", str(tmp_path / "never-loaded"), *extra]  # fmt: skip
    run_case(argv, message, capsys, monkeypatch, tmp_path, workspace)


@pytest.mark.parametrize("kind", ["non-empty-dir", "a-file", "symlink-to-dir", "parent-is-file"])
def test_bad_export_targets(workspace, tmp_path, capsys, monkeypatch, kind):
    target = tmp_path / "adapter"
    message = {"non-empty-dir": "is not an empty directory", "a-file": "is not an empty directory",
               "symlink-to-dir": "is a symlink", "parent-is-file": "is not a writable directory"}[kind]  # fmt: skip
    if kind == "non-empty-dir":
        target.mkdir()
        (target / "keep.txt").write_text("mine")
    elif kind == "a-file":
        target.write_text("mine")
    elif kind == "symlink-to-dir":
        (tmp_path / "real").mkdir()
        target.symlink_to(tmp_path / "real")
    else:
        (tmp_path / "file").write_text("x")
        target = tmp_path / "file" / "adapter"
    argv = ["export", str(workspace["root"] / "ranks.json"), str(target), "--model", str(tmp_path / "never-loaded")]
    run_case(argv, message, capsys, monkeypatch, tmp_path, workspace)


def test_merge_needs_two_distinct_files(workspace, tmp_path, capsys, monkeypatch):
    stats = str(workspace["root"] / "stats.safetensors")
    out = str(tmp_path / "out" / "m.safetensors")
    run_case(["merge", stats, "-o", out], "at least two", capsys, monkeypatch, tmp_path, workspace)
    run_case(["merge", stats, stats, "-o", out], "more than once", capsys, monkeypatch, tmp_path, workspace)
