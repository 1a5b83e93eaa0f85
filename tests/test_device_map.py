"""Models dispatched by accelerate (``device_map``, with weights offloaded to disk) calibrate to the same
statistics as the model loaded whole; the statistics stay on each module's execution device."""

import pytest
import sensilora
import torch
from sensilora.errors import SensiloraError

from tests.models import random_batches

accelerate = pytest.importorskip("accelerate")


@pytest.mark.parametrize("mode", ["diag", "obs"])
def test_offloaded_model_calibrates_like_the_whole_model(tmp_path, mode):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    whole = LlamaForCausalLM.from_pretrained(tmp_path / "model")
    on_disk = {"model.layers.1": "disk", "model.layers.2": "disk"}
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", **on_disk,
                  "model.norm": "cpu", "lm_head": "cpu"}  # fmt: skip
    spread = LlamaForCausalLM.from_pretrained(tmp_path / "model", device_map=device_map,
                                              offload_folder=str(tmp_path / "offload"))  # fmt: skip
    assert spread.model.layers[2].mlp.up_proj.weight.device.type == "meta"  # really offloaded
    batches = random_batches(3)
    expected = sensilora.calibrate(whole, batches, mode=mode, progress=False)
    got = sensilora.calibrate(spread, batches, mode=mode, progress=False)
    assert got.module_inputs == expected.module_inputs
    for key, stats in expected.inputs.items():
        assert got.inputs[key].num_tokens == stats.num_tokens
        torch.testing.assert_close(got.inputs[key].hessian_diag, stats.hessian_diag, rtol=1e-5, atol=1e-7)
        if mode == "obs":
            torch.testing.assert_close(got.inputs[key].inverse_hessian_diag, stats.inverse_hessian_diag,
                                       rtol=1e-4, atol=1e-6)  # fmt: skip
    with pytest.raises(SensiloraError, match="calibrate it without sequential"):
        sensilora.calibrate(spread, batches, mode=mode, sequential=True, device="cpu", progress=False)
    # obs saliencies read the offloaded weights (loaded module by module): the same ranks
    assert (
        sensilora.allocate(got, avg_rank=4, model=spread).ranks
        == sensilora.allocate(got, avg_rank=4, model=whole).ranks
    )


def test_cli_device_auto_gives_the_same_ranks(tiny_model_dir, tmp_path, capsys):
    import json

    from sensilora.cli import main

    def ranks(device: str, out):
        outputs = ["--output", str(out / "r.json"), "--plot", str(out / "r.png")]
        args = ["allocate", "--model", str(tiny_model_dir), "--samples", "2", "--seq-len", "16", "--quiet",
                "--min-tokens", "1", "--device", device, *outputs]  # fmt: skip
        assert main(args) == 0, capsys.readouterr().err
        return json.loads((out / "r.json").read_text())["modules"]

    assert ranks("auto", tmp_path / "auto") == ranks("cpu", tmp_path / "cpu")
    assert main(["allocate", "--model", str(tiny_model_dir), "--device", "auto", "--sequential"]) == 2
    assert "sequential mode moves one layer at a time" in capsys.readouterr().err
