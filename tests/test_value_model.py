"""ValueModel: construction from backbones, safetensors round trips, the Hub path (offline), and bad files."""

import json

import pytest
import torch
from huggingface_hub import constants

from vas_logits import ValueModel, ValueModelConfig

from .helpers import ARCHITECTURES, BOS, PAD, VOCAB_SIZE, tiny_causal_lm, tiny_config, tiny_value_model

IDS = torch.tensor([[BOS, 5, 6, 7, 8], [PAD, PAD, BOS, 9, 10]])


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_forward_shapes_and_zero_head(architecture):
    value_model = ValueModel.from_backbone(tiny_config(architecture))
    output = value_model(IDS, attention_mask=(IDS != PAD).long())
    assert output.values.shape == IDS.shape and output.values.dtype == torch.float32
    assert torch.equal(output.values, torch.zeros_like(output.values))  # a fresh head changes nothing
    assert value_model.config.vocab_size == VOCAB_SIZE
    assert not value_model.training


@pytest.mark.parametrize("architecture", ["llama", "gpt2", "qwen2"])
def test_left_padding_gives_the_unpadded_values(architecture):
    value_model = tiny_value_model(architecture)
    padded = value_model(IDS[1:], attention_mask=(IDS[1:] != PAD).long()).values[0, 2:]
    unpadded = value_model(IDS[1:, 2:]).values[0]
    assert torch.allclose(padded, unpadded, atol=1e-5)


def test_cached_forward_equals_full_forward():
    value_model = tiny_value_model("mistral")
    full = value_model(IDS[:1]).values
    first = value_model(IDS[:1, :3], use_cache=True)
    second = value_model(IDS[:1, 3:], cache=first.cache, use_cache=True)
    assert torch.allclose(torch.cat([first.values, second.values], -1), full, atol=1e-5)


@pytest.mark.parametrize("architecture", ["llama", "gpt2", "gpt_neox", "qwen2"])
def test_from_backbone_cuts_the_first_layers_and_copies(architecture):
    base = tiny_causal_lm(architecture)
    value_model = ValueModel.from_backbone(base, num_layers=1, reward="test")
    assert value_model.backbone.config.num_hidden_layers == 1
    assert value_model.config.reward == "test"
    # Same weights as the base's first layer, but never the same storage.
    base_state, value_state = base.base_model.state_dict(), value_model.backbone.state_dict()
    for key, tensor in value_state.items():
        assert torch.equal(tensor, base_state[key]), key
        assert tensor.data_ptr() != base_state[key].data_ptr(), key
    # Training the value model must not touch the base.
    before = {key: tensor.clone() for key, tensor in base.state_dict().items()}
    value_model.train()
    loss = value_model(IDS[:1]).values.pow(2).sum() + sum(p.sum() for p in value_model.parameters())
    loss.backward()
    torch.optim.SGD(value_model.parameters(), lr=0.1).step()
    for key, tensor in base.state_dict().items():
        assert torch.equal(tensor, before[key]), key


def test_from_backbone_from_a_local_path(tmp_path):
    base = tiny_causal_lm("llama")
    base.save_pretrained(tmp_path / "base")
    value_model = ValueModel.from_backbone(str(tmp_path / "base"), num_layers=1)
    assert value_model.backbone.config.num_hidden_layers == 1
    assert value_model.config.base_model == str(tmp_path / "base")
    key = "layers.0.self_attn.q_proj.weight"
    assert torch.equal(value_model.backbone.state_dict()[key], base.base_model.state_dict()[key])


@pytest.mark.parametrize("num_layers", [0, 3, 1.5, True])
def test_from_backbone_rejects_bad_num_layers(num_layers):
    with pytest.raises(ValueError, match="`num_layers`"):
        ValueModel.from_backbone(tiny_config("llama"), num_layers=num_layers)


def test_from_backbone_rejects_other_sources():
    with pytest.raises(TypeError, match="`source`"):
        ValueModel.from_backbone(42)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("head", ["scalar", "token"])
def test_save_load_round_trip_is_exact(tmp_path, architecture, head):
    value_model = tiny_value_model(architecture, head=head)
    value_model.config.reward = "sentiment"
    value_model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded = ValueModel.from_pretrained(tmp_path)
    assert loaded.config == value_model.config
    for (key, tensor), (other_key, other) in zip(value_model.state_dict().items(), loaded.state_dict().items()):
        assert key == other_key and torch.equal(tensor, other)
    assert torch.equal(loaded(IDS).values, value_model(IDS).values)


def test_dtype_is_kept_and_can_be_overridden(tmp_path):
    tiny_value_model("llama", dtype=torch.bfloat16).save_pretrained(tmp_path)
    assert ValueModel.from_pretrained(tmp_path).dtype == torch.bfloat16
    assert ValueModel.from_pretrained(tmp_path, dtype=torch.float32).dtype == torch.float32


def test_model_card_metadata(tmp_path):
    value_model = tiny_value_model("llama")
    value_model.config.base_model = "HuggingFaceTB/SmolLM2-135M-Instruct"
    value_model.save_pretrained(tmp_path)
    from huggingface_hub import ModelCard

    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "vas_logits"
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert {"vas", "value-model"} <= set(card.data.tags)
    assert "VAS(value_model" in card.text


def _populate_hub_cache(cache_dir, repo_id, folder, commit="0123456789abcdef0123456789abcdef01234567"):
    """Lay out files as huggingface_hub's cache does after a download: blobs, a snapshot and refs/main."""
    repo_dir = cache_dir / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    for file in folder.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())


def test_from_pretrained_hub_id_offline_through_the_cache(tmp_path, monkeypatch):
    value_model = tiny_value_model("gpt2")
    value_model.save_pretrained(tmp_path / "saved")
    _populate_hub_cache(tmp_path / "hub", "someone/vas-test", tmp_path / "saved")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    loaded = ValueModel.from_pretrained("someone/vas-test", cache_dir=tmp_path / "hub")
    assert torch.equal(loaded(IDS).values, value_model(IDS).values)
    with pytest.raises(Exception, match="(?i)offline|cache|not found|connection"):
        ValueModel.from_pretrained("someone/not-cached", cache_dir=tmp_path / "hub")


def test_push_to_hub_uploads_config_weights_and_card(tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)

    def upload_folder(self, repo_id, folder_path, **kwargs):
        calls["files"] = {p.name: p.read_bytes() for p in __import__("pathlib").Path(folder_path).iterdir()}
        calls["upload"] = (repo_id, kwargs)
        return "https://huggingface.co/someone/vas-test/commit/abc"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    value_model = tiny_value_model("llama")
    url = value_model.push_to_hub("someone/vas-test", private=True, commit_message="first")
    assert url.endswith("/commit/abc")
    assert calls["create_repo"][0] == "someone/vas-test" and calls["create_repo"][1]["private"] is True
    assert calls["upload"][1]["commit_message"] == "first"
    assert set(calls["files"]) == {"config.json", "model.safetensors", "README.md"}
    (tmp_path / "pushed").mkdir()
    for name, data in calls["files"].items():
        (tmp_path / "pushed" / name).write_bytes(data)
    assert torch.equal(ValueModel.from_pretrained(tmp_path / "pushed")(IDS).values, value_model(IDS).values)


def test_missing_file_is_named(tmp_path):
    tiny_value_model("llama").save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        ValueModel.from_pretrained(tmp_path)


def test_truncated_weights_are_named(tmp_path):
    tiny_value_model("llama").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match="model.safetensors"):
        ValueModel.from_pretrained(tmp_path)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_value_model("llama").save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["head.extra"] = state.pop("head.bias")
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing keys \['head.bias'\].*unexpected keys \['head.extra'\]"):
        ValueModel.from_pretrained(tmp_path)


def test_shape_mismatch_is_an_error(tmp_path):
    tiny_value_model("llama").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["backbone_config"]["hidden_size"] = 64
    config["backbone_config"]["head_dim"] = 16
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not match"):
        ValueModel.from_pretrained(tmp_path)


def test_corrupt_config_is_named(tmp_path):
    tiny_value_model("llama").save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        ValueModel.from_pretrained(tmp_path)


def test_pickled_weights_are_never_loaded(tmp_path):
    value_model = tiny_value_model("llama")
    value_model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(value_model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        ValueModel.from_pretrained(tmp_path)


def test_config_validation():
    with pytest.raises(ValueError, match="`backbone_config`"):
        ValueModelConfig(backbone_config={"hidden_size": 4})
    with pytest.raises(ValueError, match="`head`"):
        ValueModelConfig(backbone_config={"model_type": "llama"}, head="vector")


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_token_head_starts_at_zero_and_reads_the_backbone_embeddings(architecture):
    base = tiny_causal_lm(architecture)
    value_model = ValueModel.from_backbone(base, num_layers=1, head="token")
    assert value_model.head.weight.shape == (32, 32) and value_model.token_bias.shape == (VOCAB_SIZE,)
    every = value_model(IDS[:1]).values
    assert every.shape == (1, IDS.shape[1], VOCAB_SIZE) and not every.any()  # Q = 0: decoding unchanged
    with torch.no_grad():
        value_model.head.bias.normal_()
    expected = value_model.head.bias @ base.get_input_embeddings().weight.T  # h-independent part: c · e_a
    assert torch.allclose(value_model(IDS[:1]).values[0, 0], expected, atol=1e-5)
