"""Loading and saving GPT-2 safetensors: both layouts in the wild, shards, every kind of bad file, atomic saves."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastlm.files
import fastlm.weights
from fastlm import GPT, WeightsError
from tests.fastlm.helpers import make_hf_model

transformers = pytest.importorskip("transformers")


def logits(model, idx):
    with torch.no_grad():
        out = model(idx)
    return out.logits if hasattr(out, "logits") else out


IDX = torch.arange(40).view(2, 20) % 101


def hub_layout(hf_model, path):
    """The original hub file: no `transformer.` prefix, with h.N.attn.bias / masked_bias mask buffers, no config."""
    tensors = {k.removeprefix("transformer."): v.contiguous() for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    n = hf_model.config.n_positions
    for i in range(hf_model.config.n_layer):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(tensors, path, metadata={"format": "pt"})
    return path


def test_loads_save_pretrained_layout(hf_model, hf_dir):
    model = GPT.from_pretrained(hf_dir)
    assert model.lm_head.weight is model.transformer.wte.weight, "the head must stay tied"
    torch.testing.assert_close(logits(model.eval(), IDX), logits(hf_model, IDX), atol=2e-5, rtol=1e-5)


def test_loads_original_hub_layout_and_infers_the_config(tmp_path):
    hf = make_hf_model(n_embd=128, n_head=2, n_layer=3)  # head dim 64, as in every GPT-2: n_head is inferred
    model = GPT.from_pretrained(hub_layout(hf, tmp_path / "gpt2.safetensors"))
    assert (model.config.n_layer, model.config.n_head, model.config.n_embd, model.config.vocab_size) == (3, 2, 128, 101)
    torch.testing.assert_close(logits(model.eval(), IDX), logits(hf, IDX), atol=2e-5, rtol=1e-5)


def test_loads_a_sharded_checkpoint(hf_model, hf_dir, tmp_path):
    state = load_file(hf_dir / "model.safetensors")
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2], "model-00002-of-00002.safetensors": keys[len(keys) // 2 :]}
    for name, part in shards.items():
        save_file({k: state[k] for k in part}, tmp_path / name, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(hf_dir / "config.json", tmp_path / "config.json")
    torch.testing.assert_close(logits(GPT.from_pretrained(tmp_path).eval(), IDX), logits(hf_model, IDX), atol=2e-5, rtol=1e-5)


def test_dtype_and_device_arguments(hf_dir):
    model = GPT.from_pretrained(hf_dir, dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.lm_head.weight is model.transformer.wte.weight


def test_save_pretrained_is_loaded_by_transformers_with_identical_logits(hf_model, hf_dir, tmp_path):
    """Round trip transformers -> fastlm -> transformers: the same tensors bit for bit, so the same logits."""
    model = GPT.from_pretrained(hf_dir).eval()
    model.save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    assert (tmp_path / "out" / "model.safetensors").stat().st_mode & 0o044, "readable by others, as a plain file write would be"
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    original = hf_model.state_dict()
    for key, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, original[key]), key
    assert torch.equal(logits(reloaded, IDX), logits(hf_model, IDX))
    torch.testing.assert_close(logits(model, IDX), logits(reloaded, IDX), atol=2e-5, rtol=1e-5)
    assert torch.equal(logits(GPT.from_pretrained(tmp_path / "out").eval(), IDX), logits(model, IDX))


def test_save_is_atomic(hf_dir, tmp_path, monkeypatch):
    """A save that fails part-way leaves the previous model.safetensors intact and no temporary files."""
    model = GPT.from_pretrained(hf_dir)
    model.save_pretrained(tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()

    def broken_save(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("fastlm.weights.save_file", broken_save)
    with torch.no_grad():
        model.transformer.wte.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_save_into_a_file_path_is_refused(hf_dir, tmp_path):
    (tmp_path / "taken").write_text("keep me")
    with pytest.raises(WeightsError, match="not a directory"):
        GPT.from_pretrained(hf_dir).save_pretrained(tmp_path / "taken")
    assert (tmp_path / "taken").read_text() == "keep me"


# -- bad input: each error names the file and, where there is one, the key ------------------------------------
def edited_copy(hf_dir, tmp_path, edit):
    state = load_file(hf_dir / "model.safetensors")
    edit(state)
    path = tmp_path / "model.safetensors"
    save_file(state, path, metadata={"format": "pt"})
    shutil.copy(hf_dir / "config.json", tmp_path / "config.json")
    return tmp_path


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.pop("transformer.h.1.mlp.c_fc.bias"), r"missing 1 weight\(s\), first 'h.1.mlp.c_fc.bias'"),
    (lambda s: s.update({"transformer.h.0.attn.extra": torch.zeros(3)}), r"unexpected key 'h.0.attn.extra'"),
    (lambda s: s.update({"transformer.h.2.ln_1.weight": torch.zeros(64)}), r"unexpected key 'h.2.ln_1.weight'"),
    (lambda s: s.update({"transformer.h.0.attn.c_attn.weight": torch.zeros(64, 64)}), r"'h.0.attn.c_attn.weight' has shape"),
    (lambda s: s.update({"lm_head.weight": torch.zeros(101, 64)}), "lm_head.weight differs"),
])
def test_inconsistent_checkpoints_are_refused(hf_dir, tmp_path, edit, message):
    path = edited_copy(hf_dir, tmp_path, edit)
    with pytest.raises(WeightsError, match=message) as info:
        GPT.from_pretrained(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_truncated_and_corrupt_files_are_refused(hf_dir, tmp_path):
    data = (hf_dir / "model.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00\x01not a safetensors file at all")
    for name in ("truncated.safetensors", "garbage.safetensors"):
        with pytest.raises(WeightsError, match=f"{name}: not a readable safetensors file"):
            GPT.from_pretrained(tmp_path / name)


def test_other_architectures_and_formats_are_refused(hf_dir, tmp_path):
    save_file({"model.embed_tokens.weight": torch.zeros(10, 4), "model.layers.0.self_attn.q_proj.weight": torch.zeros(4, 4)},
              tmp_path / "llama.safetensors")
    with pytest.raises(WeightsError, match="not a GPT-2 checkpoint"):
        GPT.from_pretrained(tmp_path / "llama.safetensors")
    other = tmp_path / "other"
    shutil.copytree(hf_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(WeightsError, match="config.json: model_type is 'llama'"):
        GPT.from_pretrained(other)
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(WeightsError, match="not a .safetensors file"):
        GPT.from_pretrained(tmp_path / "model.bin")
    with pytest.raises(WeightsError, match="no such file"):
        GPT.from_pretrained(tmp_path / "missing.safetensors")
    with pytest.raises(WeightsError, match="no model.safetensors"):
        GPT.from_pretrained(tmp_path / "other" / "..")


@pytest.mark.parametrize("change,message", [
    (lambda c: [c], r"config.json: not a config \(a JSON list, not an object\)"),
    (lambda c: {**c, "n_embd": None}, "config.json: n_embd must be an integer, got None"),
    (lambda c: {**c, "n_layer": 2.0}, "config.json: n_layer must be an integer, got 2.0"),
    (lambda c: {**c, "layer_norm_epsilon": "1e-5"}, "config.json: layer_norm_epsilon must be a number, got '1e-5'"),
    (lambda c: {**c, "layer_norm_epsilon": -1}, r"config.json: layer_norm_epsilon must be a number in \(0, 1\), got -1"),
    (lambda c: {**c, "n_head": 3}, r"config.json: n_embd \(64\) must be a multiple of n_head \(3\)"),
])
def test_config_values_of_the_wrong_type_or_out_of_range_are_refused(hf_dir, tmp_path, change, message):
    shutil.copytree(hf_dir, tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    (tmp_path / "model" / "config.json").write_text(json.dumps(change(config)))
    with pytest.raises(WeightsError, match=message) as info:
        GPT.from_pretrained(tmp_path / "model")
    assert "\n" not in str(info.value)


def test_our_files_carry_their_config_and_a_checksum(hf_dir, tmp_path):
    """The model.safetensors fastlm writes knows its own config: without config.json it loads as the model it is
    (a head count that the tensors' shapes cannot tell: 2 heads of 32, where GPT-2's head dim would infer 1), and a
    config.json that contradicts it is refused."""
    model = GPT.from_pretrained(hf_dir)
    model.save_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    alone = GPT.from_pretrained(tmp_path / "model.safetensors")
    assert alone.config == model.config and alone.config.n_head == 2
    assert torch.equal(logits(alone, IDX), logits(model, IDX))
    config = json.loads((hf_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_head": 4}))
    with pytest.raises(WeightsError, match=r"config.json: says n_head 4, but model.safetensors was saved as a model with "
                                           r"n_head 2: the two files are not one model"):
        GPT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert transformers.GPT2LMHeadModel.from_pretrained(tmp_path) is not None, "the metadata does not bother transformers"


def test_config_json_is_written_before_the_model(hf_dir, tmp_path, monkeypatch):
    """So that a model.safetensors is never there without its config (an interrupted save leaves config.json only)."""
    written = []
    real = fastlm.files.atomic_write
    monkeypatch.setattr(fastlm.files, "atomic_write", lambda target, write: written.append(target.name) or real(target, write))
    monkeypatch.setattr(fastlm.weights, "atomic_write", fastlm.files.atomic_write)
    GPT.from_pretrained(hf_dir).save_pretrained(tmp_path)
    assert written == ["config.json", "model.safetensors"]
