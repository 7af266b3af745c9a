"""model.py against Hugging Face's LlamaForCausalLM, Meta's checkpoint layout, and LIMA's dialogue format."""
import errno
import io
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoint import CheckpointError, load_checkpoint, load_model
from model import ModelArgs, Tokenizer, Transformer

ROOT = Path(__file__).parent
LLAMA_TOKENIZER = ROOT.parent / "shared" / "llama" / "tokenizer.model"


def hf_model(n_kv_heads=4, vocab=96, seed=0, rope_theta=10000.0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=n_kv_heads, rms_norm_eps=1e-5, max_position_embeddings=128, rope_theta=rope_theta,
        tie_word_embeddings=False, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():  # non-trivial norm gains, so a norm loaded into the wrong place shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.5 * torch.randn_like(p))
    return model


def to_meta_layout(hf_sd, heads, kv_heads, dim, shards, out: Path):
    """Write HF weights the way Meta released LLaMA: Meta names, rotary pairs interleaved, split across
    `shards` model-parallel files (column-parallel on dim 0, row-parallel and embeddings on dim 1)."""
    def unpermute(w, n):  # inverse of HF's convert_llama_weights_to_hf.permute
        return w.view(n, 2, w.shape[0] // n // 2, dim).transpose(1, 2).reshape(w.shape)
    names = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
             "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
             "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
    meta = {"tok_embeddings.weight": hf_sd["model.embed_tokens.weight"], "norm.weight": hf_sd["model.norm.weight"],
            "output.weight": hf_sd["lm_head.weight"]}
    for k, v in hf_sd.items():
        if k.startswith("model.layers."):
            _, _, i, sub = k.rsplit(".", 1)[0].split(".", 3)
            if sub == "self_attn.q_proj":
                v = unpermute(v, heads)
            if sub == "self_attn.k_proj":
                v = unpermute(v, kv_heads)
            meta[f"layers.{i}.{names[sub]}.weight"] = v
    split = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}
    out.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        part = {}
        for k, v in meta.items():
            dim_ = split.get(k.split(".")[-2])
            part[k] = v.clone() if dim_ is None else v.chunk(shards, dim_)[s].clone()
        part["rope.freqs"] = torch.zeros(dim // heads // 2)  # Meta's files carry this buffer
        torch.save(part, out / f"consolidated.{s:02d}.pth")
    (out / "params.json").write_text(json.dumps(
        {"dim": dim, "n_layers": 2, "n_heads": heads, "n_kv_heads": kv_heads, "multiple_of": 16,
         "ffn_dim_multiplier": 1.0, "norm_eps": 1e-5, "vocab_size": -1}))
    return out


@pytest.mark.parametrize("n_kv_heads", [4, 2], ids=["mha", "gqa"])
def test_logits_match_transformers(tmp_path, n_kv_heads):
    ref = hf_model(n_kv_heads)
    tokens = torch.randint(0, 96, (2, 37))
    with torch.no_grad():
        want = ref(tokens).logits
    sd = ref.state_dict()
    ref.save_pretrained(tmp_path / "hf_safetensors")
    (tmp_path / "hf_bin").mkdir()
    (tmp_path / "hf_bin" / "config.json").write_text((tmp_path / "hf_safetensors" / "config.json").read_text())
    torch.save(sd, tmp_path / "hf_bin" / "pytorch_model.bin")
    ref.save_pretrained(tmp_path / "hf_sharded", max_shard_size="100KB")  # several files + index json
    assert (tmp_path / "hf_sharded" / "model.safetensors.index.json").exists()
    # multiple_of=16 with ffn_dim_multiplier 1.0: int(8*64/3)=170 -> 176, the HF intermediate_size
    to_meta_layout(sd, 4, n_kv_heads, 64, 2, tmp_path / "meta")
    for layout in ["hf_safetensors", "hf_bin", "hf_sharded", "meta"]:
        model = load_model(tmp_path / layout).eval()
        assert model.args.n_kv_heads == n_kv_heads and model.args.hidden_dim == 176
        with torch.no_grad():
            got = model(tokens)
        err = (got - want).abs().max().item()
        assert err <= 1e-5 * want.abs().max().item(), (layout, err)


def test_transformers5_rope_parameters(tmp_path):
    """transformers 5 writes the RoPE base into "rope_parameters": a base of 500,000 must load as such (read
    as the default 10,000, the logits are off by about 2% of their scale); a scaling this model lacks is
    refused."""
    ref = hf_model(rope_theta=500000.0)
    ref.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "rope_theta" not in config and config["rope_parameters"]["rope_theta"] == 500000.0
    tokens = torch.randint(0, 96, (2, 100))
    with torch.no_grad():
        want, got = ref(tokens).logits, load_model(tmp_path / "hf").eval()(tokens)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    for rope in ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 500000.0}},
                 {"rope_scaling": {"type": "linear", "factor": 2.0}}):
        (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, **rope}))
        kind = next(iter(rope.values())).get("rope_type", "linear")
        with pytest.raises(CheckpointError, match=f"config.json: not a LLaMA config \\(RoPE scaling '{kind}' "
                                                  "is not implemented\\)"):
            load_checkpoint(tmp_path / "hf")


def test_bad_hf_files_are_one_line(tmp_path, monkeypatch):
    """safetensors missing, a safetensors header that lies, JSON nested past Python's recursion limit."""
    hf_model().save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "safetensors", None)  # as if not installed: importing it raises ImportError
        with pytest.raises(CheckpointError, match="model.safetensors: reading it needs the safetensors"):
            load_checkpoint(tmp_path)
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header["lm_head.weight"]["shape"][0] += 1  # more rows than its bytes hold
    h = json.dumps(header).encode()
    file.write_bytes(len(h).to_bytes(8, "little") + h + raw[8 + n :])
    with pytest.raises(CheckpointError, match="model.safetensors: not a valid safetensors file"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("size,count", [("7B", 6_738_415_616), ("13B", 13_015_864_320), ("33B", 32_528_943_616),
                                        ("30B", 32_528_943_616), ("65B", 65_285_660_672)])
def test_parameter_counts(size, count):
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_size(size))
    assert sum(p.numel() for p in model.parameters()) == count


def test_unknown_size():
    with pytest.raises(ValueError, match="unknown size '8B'"):
        ModelArgs.from_size("8B")


def test_residual_dropout_rises_linearly():
    model = Transformer(ModelArgs.from_size("tiny", n_layers=4, vocab_size=10, dropout=0.3))
    assert [b.dropout for b in model.layers] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    model.train()
    x = torch.randint(0, 10, (1, 8))
    assert not torch.equal(model(x), model(x))  # dropout active in training
    model.eval()
    assert torch.equal(model(x), model(x))


def test_cached_decoding_equals_full_forward():
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_size("tiny", dim=64, n_layers=2, vocab_size=50, n_kv_heads=2)).eval()
    tokens = torch.randint(0, 50, (3, 24))
    pos = torch.arange(24).expand(3, 24)
    with torch.no_grad():
        full = model(tokens)
        cache = model.make_cache(3, 32)
        steps = [model(tokens[:, :7], cache, pos[:, :7])]
        steps += [model(tokens[:, t : t + 1], cache, pos[:, t : t + 1]) for t in range(7, 20)]
        steps.append(model(tokens[:, 20:], cache, pos[:, 20:]))  # a multi-token chunk after the cache (a chat turn)
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def test_rows_of_a_batch_sit_at_their_own_positions():
    """Prompts of different lengths, right-padded into one batch, then decoded one token per row at each
    row's own position: every row gets the logits it gets alone, whatever the padding holds."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_size("tiny", dim=64, n_layers=2, vocab_size=50)).eval()
    short, long = torch.randint(0, 50, (1, 5)), torch.randint(0, 50, (1, 9))
    batch = torch.cat([torch.cat([short, torch.randint(0, 50, (1, 4))], 1), long])
    with torch.no_grad():
        cache = model.make_cache(2, 12)
        padded = model(batch, cache, torch.arange(9).expand(2, 9))
        nxt = model(torch.tensor([[7], [8]]), cache, torch.tensor([[5], [9]]))  # each row's next position
        alone = [model(short), model(long), model(torch.cat([short, torch.tensor([[7]])], 1))[:, -1],
                 model(torch.cat([long, torch.tensor([[8]])], 1))[:, -1]]
    assert torch.allclose(padded[0, :5], alone[0][0], atol=1e-5)
    assert torch.allclose(padded[1], alone[1][0], atol=1e-5)
    assert torch.allclose(nxt[0, 0], alone[2][0], atol=1e-5) and torch.allclose(nxt[1, 0], alone[3][0], atol=1e-5)


def test_grow_vocab_adds_mean_rows():
    model = Transformer(ModelArgs.from_size("tiny", dim=32, n_layers=1, vocab_size=20))
    emb, out = model.tok_embeddings.weight.clone(), model.output.weight.clone()
    model.grow_vocab(21)
    assert model.tok_embeddings.weight.shape == (21, 32) and model.output.weight.shape == (21, 32)
    assert torch.allclose(model.tok_embeddings.weight[20], emb.mean(0))
    assert torch.allclose(model.output.weight[20], out.mean(0))
    assert torch.equal(model.tok_embeddings.weight[:20], emb)
    assert model(torch.tensor([[20, 3]])).shape == (1, 2, 21)


def test_from_pretrained_grows_eot(tmp_path):
    to_meta_layout(hf_model().state_dict(), 4, 4, 64, 1, tmp_path)
    model = load_model(tmp_path, vocab_size=97)
    assert model.args.vocab_size == 97 and model.output.weight.shape == (97, 64)
    assert load_model(tmp_path, vocab_size=96).args.vocab_size == 96  # EOT already there
    with pytest.raises(CheckpointError, match=r"has 96 tokens, expected 98 \(a base LLaMA\) or 99 \(with EOT\)"):
        load_model(tmp_path, vocab_size=99)


# -----------------------------------------------------------------------------
# Bad checkpoints: one clear error naming file, key and shapes


@pytest.fixture
def meta_dir(tmp_path):
    return to_meta_layout(hf_model().state_dict(), 4, 4, 64, 2, tmp_path / "meta")


def test_empty_dir(tmp_path):
    with pytest.raises(CheckpointError, match="neither params.json .* nor config.json"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_checkpoint(tmp_path / "nope")


def test_missing_shard(meta_dir):
    (meta_dir / "consolidated.01.pth").unlink()
    with pytest.raises(CheckpointError, match=r"consolidated.01.pth: missing shard"):
        load_checkpoint(meta_dir)
    (meta_dir / "consolidated.00.pth").rename(meta_dir / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match=r"consolidated.00.pth: missing shard"):
        load_checkpoint(meta_dir)


def test_unknown_key_and_shape_mismatch(meta_dir):
    shard = torch.load(meta_dir / "consolidated.01.pth", weights_only=True)
    torch.save({**shard, "layers.0.attention.bias": torch.zeros(3)}, meta_dir / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match=rf"{meta_dir}: .*Unexpected key\(s\) .*\"layers.0.attention.bias\""):
        load_checkpoint(meta_dir)
    shard["layers.1.feed_forward.w2.weight"] = torch.zeros(64, 80)
    torch.save(shard, meta_dir / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match=rf"{meta_dir}: .*size mismatch for layers.1.feed_forward.w2.weight: "
                                              r".*shape torch.Size\(\[64, 168\]\) .*torch.Size\(\[64, 176\]\)"):
        load_checkpoint(meta_dir)


def test_missing_key_and_bad_files(meta_dir, tmp_path):
    for f in meta_dir.glob("consolidated.*.pth"):
        shard = torch.load(f, weights_only=True)
        del shard["layers.1.ffn_norm.weight"]
        torch.save(shard, f)
    with pytest.raises(CheckpointError, match=rf"{meta_dir}: .*Missing key\(s\) .*\"layers.1.ffn_norm.weight\""):
        load_checkpoint(meta_dir)
    params = (meta_dir / "params.json").read_text()
    for bad in ["[1]", '{"dim": "64"}', '{"n_heads": 0}']:
        (meta_dir / "params.json").write_text(bad)
        with pytest.raises(CheckpointError, match=r"params.json: not LLaMA's parameters"):
            load_checkpoint(meta_dir)
    (meta_dir / "params.json").write_text(params)
    (meta_dir / "consolidated.00.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"consolidated.00.pth: cannot be read as a weights-only"):
        load_checkpoint(meta_dir)
    (meta_dir / "params.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"params.json: not valid JSON"):
        load_checkpoint(meta_dir)


def test_hf_index_names_missing_file(tmp_path):
    hf_model().save_pretrained(tmp_path, max_shard_size="100KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"{victim.name}: missing shard listed in .*index.json"):
        load_checkpoint(tmp_path)
    for bad in ["{}", '{"weight_map": [1]}', '{"weight_map": {"a": 1}}']:
        (tmp_path / "model.safetensors.index.json").write_text(bad)
        with pytest.raises(CheckpointError, match=r'index.json: expected a "weight_map" of weight names to files'):
            load_checkpoint(tmp_path)


def test_hf_config_without_llama_fields(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(CheckpointError, match=r"config.json: no 'intermediate_size', expected a LLaMA config"):
        load_checkpoint(tmp_path)


def test_hf_shape_mismatch(tmp_path):
    ref = hf_model()
    sd = ref.state_dict()
    sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(170, 64)
    hf_model().config.save_pretrained(tmp_path)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=rf"{tmp_path}: .*size mismatch for layers.0.feed_forward.w3.weight: "
                                              r".*shape torch.Size\(\[170, 64\]\) .*torch.Size\(\[176, 64\]\)"):
        load_checkpoint(tmp_path)


def hf_dir(path: Path, **config) -> Path:
    """A small Hugging Face LLaMA directory, these fields of its config.json replaced."""
    hf_model().save_pretrained(path)
    saved = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**saved, **config}))
    return path


def test_bin_that_is_not_a_dict_of_tensors(tmp_path):
    hf_model().config.save_pretrained(tmp_path)
    file = tmp_path / "pytorch_model.bin"
    expected = "expected a dict of weight names to tensors"
    for bad, why in (([torch.zeros(2)], "an object of type list"),
                     ({0: torch.zeros(2)}, "the key 0 of type int"),
                     ({"w": {"x": torch.zeros(2)}}, "w of type dict")):
        torch.save(bad, file)
        with pytest.raises(CheckpointError, match=rf"^{file}: holds {why}, {expected}$"):
            load_checkpoint(tmp_path)


def test_key_without_a_module_is_an_unexpected_key(tmp_path):
    ref = hf_model()
    ref.config.save_pretrained(tmp_path)
    torch.save({**ref.state_dict(), "bias": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    unexpected = rf"^{tmp_path}: [^\n]*Unexpected key\(s\) [^\n]*\"bias\""
    with pytest.raises(CheckpointError, match=unexpected):
        load_checkpoint(tmp_path)


def test_config_json_that_is_not_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[]")
    with pytest.raises(CheckpointError, match=rf"^{tmp_path}/config.json: holds a JSON list, "
                                              r"expected a LLaMA config \(an object\)$"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("field", ["rope_parameters", "rope_scaling"])
def test_rope_settings_that_are_not_objects(tmp_path, field):
    hf_dir(tmp_path, **{field: "default"})
    with pytest.raises(CheckpointError, match=rf"^{tmp_path}/config.json: not a LLaMA config "
                                              rf"\({field} is 'default', expected an object\)$"):
        load_checkpoint(tmp_path)


def test_meta_shard_that_is_a_list(meta_dir):
    for name in ("consolidated.01.pth", "consolidated.00.pth"):  # the first is read on its own
        torch.save([torch.zeros(2)], meta_dir / name)
        with pytest.raises(CheckpointError, match=rf"^{meta_dir}/{name}: holds an object of "
                                                  r"type list, expected a dict of weight names "
                                                  r"to tensors$"):
            load_checkpoint(meta_dir)


@pytest.mark.parametrize("name,shape", [("layers.0.attention.wo.weight", (2048,)),
                                        ("layers.0.attention.wq.weight", ()),
                                        ("layers.1.ffn_norm.weight", (64, 1)),
                                        ("tok_embeddings.weight", (3072,))])
def test_meta_weight_of_the_wrong_rank(meta_dir, name, shape):
    file = meta_dir / "consolidated.00.pth"
    shard = torch.load(file, weights_only=True)
    torch.save({**shard, name: torch.zeros(shape)}, file)
    rank = 1 if "norm" in name else 2
    message = rf"^{file}: {name} has shape {re.escape(str(shape))}, expected a {rank}-D weight$"
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(meta_dir)


def test_hf_weight_of_the_wrong_rank(tmp_path):
    ref = hf_model()
    ref.config.save_pretrained(tmp_path)
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.save({**ref.state_dict(), name: torch.tensor(1.0)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=rf"^{tmp_path}/pytorch_model.bin: {name} has shape "
                                              r"\(\), expected a 2-D weight$"):
        load_checkpoint(tmp_path)


class Planted:
    """Pickled as a call of os.system: what a weights-only load must refuse."""

    def __reduce__(self):
        return os.system, ("true",)


@pytest.mark.parametrize("layout", ["hf", "meta"])
def test_planted_pickle_is_refused_in_one_line(tmp_path, layout):
    if layout == "hf":
        hf_model().config.save_pretrained(tmp_path)
        file = tmp_path / "pytorch_model.bin"
    else:
        to_meta_layout(hf_model().state_dict(), 4, 4, 64, 1, tmp_path)
        file = tmp_path / "consolidated.00.pth"
    torch.save({"w": Planted()}, file)
    refusal = r"\(Weights only load failed\. [^\n]*posix\.system[^\n]*\)$"
    with pytest.raises(CheckpointError,
                       match=rf"^{file}: cannot be read as a weights-only checkpoint {refusal}"):
        load_checkpoint(tmp_path)


@pytest.fixture
def modes_bind(monkeypatch):
    """Root reads files and directories whatever their mode: make io.open and os.listdir refuse what
    its owner may not read, as they do for any other user."""
    if os.geteuid() != 0:
        return
    real_open, real_listdir = io.open, os.listdir

    def refuse_unreadable(path):
        if isinstance(path, (str, Path)) and os.path.exists(path):
            if not os.stat(path).st_mode & stat.S_IRUSR:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    def guarded_open(file, *args, **kwargs):
        refuse_unreadable(file)
        return real_open(file, *args, **kwargs)

    def guarded_listdir(path="."):
        refuse_unreadable(path)
        return real_listdir(path)

    monkeypatch.setattr(io, "open", guarded_open)
    monkeypatch.setattr(os, "listdir", guarded_listdir)


@pytest.mark.parametrize("victim", ["config.json", "model.safetensors.index.json",
                                    "model-00001-of-00002.safetensors", "pytorch_model.bin",
                                    "params.json", "consolidated.01.pth", "."])
def test_unreadable_file_is_one_line(tmp_path, modes_bind, victim):
    if victim in ("params.json", "consolidated.01.pth"):
        to_meta_layout(hf_model().state_dict(), 4, 4, 64, 2, tmp_path)
    elif victim == "pytorch_model.bin":
        ref = hf_model()
        ref.config.save_pretrained(tmp_path)
        torch.save(ref.state_dict(), tmp_path / victim)
    else:
        hf_model().save_pretrained(tmp_path, max_shard_size="300KB")
    file = tmp_path / victim
    mode = file.stat().st_mode
    file.chmod(0)
    try:
        with pytest.raises(CheckpointError,
                           match=rf"^{file}: cannot be read \(Permission denied\)$"):
            load_checkpoint(tmp_path)
    finally:
        file.chmod(mode)


@pytest.mark.parametrize("config,why", [
    ({"num_key_value_heads": 3}, "num_key_value_heads 3 does not divide num_attention_heads 4 "
                                 r"\(each key/value head serves as many queries\)"),
    ({"num_attention_heads": 5}, "hidden_size 64 is not a multiple of num_attention_heads 5"),
    ({"num_attention_heads": 64}, r"hidden_size 64 / num_attention_heads 64: an odd head size "
                                  r"\(RoPE rotates pairs\)"),
    ({"rms_norm_eps": -1}, "rms_norm_eps is -1, expected a positive number"),
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps is '1e-5', expected a positive number"),
    ({"rope_theta": 0}, "rope_theta is 0, expected a positive number"),
    ({"rope_parameters": {"rope_theta": float("nan")}},
     "rope_theta is nan, expected a positive number"),
    ({"max_position_embeddings": 10**9},
     "max_position_embeddings is 1000000000, expected a positive int of at most 1048576"),
    ({"max_position_embeddings": 2048.0},
     "max_position_embeddings is 2048.0, expected a positive int of at most 1048576"),
    ({"vocab_size": 0}, "vocab_size is 0, expected a positive int"),
    ({"num_hidden_layers": True}, "num_hidden_layers is True, expected a positive int"),
], ids=["kv_heads", "heads", "odd_head", "eps", "eps_str", "theta", "theta_nan", "context",
        "context_float", "vocab", "layers_bool"])
def test_bad_hf_config_values(tmp_path, config, why):
    hf_dir(tmp_path, **config)
    with pytest.raises(CheckpointError,
                       match=rf"^{tmp_path}/config.json: not a LLaMA config \({why}\)$"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("params,why", [
    ({"n_kv_heads": 3},
     r"n_kv_heads 3 does not divide n_heads 4 \(each key/value head serves as many queries\)"),
    ({"n_heads": 6}, "dim 64 is not a multiple of n_heads 6"),
    ({"norm_eps": 0}, "norm_eps is 0, expected a positive number"),
    ({"rope_theta": -10000.0}, "rope_theta is -10000.0, expected a positive number"),
    ({"max_seq_len": 1 << 21},
     "max_seq_len is 2097152, expected a positive int of at most 1048576"),
    ({"dim": 64.0}, "dim is 64.0, expected a positive int"),
    ({"vocab_size": "96"}, "vocab_size is '96', expected a positive int"),
    ({"ffn_dim_multiplier": 0}, "ffn_dim_multiplier is 0, expected a positive number"),
], ids=["kv_heads", "heads", "eps", "theta", "context", "dim_float", "vocab_str", "ffn"])
def test_bad_meta_params(meta_dir, params, why):
    saved = json.loads((meta_dir / "params.json").read_text())
    (meta_dir / "params.json").write_text(json.dumps({**saved, **params}))
    with pytest.raises(CheckpointError,
                       match=rf"^{meta_dir}/params.json: not LLaMA's parameters \({why}\)$"):
        load_checkpoint(meta_dir)


def test_meta_shards_that_disagree_on_a_replicated_weight(meta_dir):
    file = meta_dir / "consolidated.01.pth"
    shard = torch.load(file, weights_only=True)
    torch.save({**shard, "norm.weight": shard["norm.weight"] + 1}, file)
    message = (rf"^{meta_dir}: norm.weight differs between consolidated.00.pth and "
               r"consolidated.01.pth, expected copies \(a replicated weight: every shard holds "
               r"it whole\)$")
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(meta_dir)


def test_load_peak_memory_is_one_copy(tmp_path):
    """Merging 8 model-parallel shards never holds a second full copy: peak RSS growth <= 1.3x checkpoint."""
    args = ModelArgs(dim=1024, n_layers=4, n_heads=8, vocab_size=8000, multiple_of=256)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    split = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}
    full = {k: torch.randn(s) for k, s in shapes.items()}
    size = sum(v.numel() * 4 for v in full.values())
    for s in range(8):
        part = {k: v if split.get(k.split(".")[-2]) is None else v.chunk(8, split[k.split(".")[-2]])[s].clone()
                for k, v in full.items()}
        torch.save(part, tmp_path / f"consolidated.{s:02d}.pth")
    (tmp_path / "params.json").write_text(json.dumps({"dim": 1024, "n_layers": 4, "n_heads": 8, "multiple_of": 256,
                                                      "norm_eps": 1e-5, "vocab_size": -1}))
    del full
    # VmHWM is this process's own peak (ru_maxrss would inherit the parent's)
    code = ("import re, sys, torch; from model import Transformer; from checkpoint import load_model\n"
            "hwm = lambda: int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1]) * 1024\n"
            "base = hwm()\n"
            "m = load_model(sys.argv[1])\n"
            "print(hwm() - base)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    growth = int(out.stdout) - 80 * 2**20  # ~70 MiB a first load costs once, whatever the size (allocator, lazy init)
    assert growth <= 1.3 * size, f"peak RSS grew {growth / size:.2f}x the checkpoint's {size / 2**20:.0f} MiB"


# -----------------------------------------------------------------------------
# Tokenizer: BOS, each turn followed by EOT, loss mask on the assistant's turns


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    d = tmp_path_factory.mktemp("spm")
    text = ["Plan a trip to Kyoto in spring.", "Day one: temples. Day two: gardens and tea.",
            "What about food?", "Try kaiseki, ramen and matcha sweets."] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(d / "t"), vocab_size=80,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, byte_fallback=False,
                                   minloglevel=2)
    return Tokenizer(d / "t.model"), spm.SentencePieceProcessor(model_file=str(d / "t.model"))


@pytest.mark.parametrize("n_turns", [2, 4])
def test_encode_dialogue(small_tokenizer, n_turns):
    tok, sp = small_tokenizer
    turns = ["Plan a trip to Kyoto.", "Day one: temples.", "What about food?", "Try ramen."][:n_turns]
    assert tok.eot_id == sp.vocab_size() == 80 and tok.n_words == 81 and tok.bos_id == 1
    ids, mask = tok.encode_dialogue(turns)
    pieces = [sp.encode(t) for t in turns]
    eot_at, pos = [], 1
    for p in pieces:
        pos += len(p)
        eot_at.append(pos)
        pos += 1
    assert ids[0] == 1 and len(ids) == len(mask) == pos
    assert [i for i, t in enumerate(ids) if t == 80] == eot_at
    for k, p in enumerate(pieces):  # each turn's tokens sit right before its EOT
        assert ids[eot_at[k] - len(p) : eot_at[k]] == p
    # mask: exactly the assistant turns (odd k) and their EOT
    want = [False]
    for k, p in enumerate(pieces):
        want += [k % 2 == 1] * (len(p) + 1)
    assert mask == want
    assert tok.decode(ids) == sp.decode(sum(pieces, []))


def test_llama_tokenizer():
    if not LLAMA_TOKENIZER.exists():
        pytest.skip(f"{LLAMA_TOKENIZER} not found: the real LLaMA tokenizer check needs it")
    tok = Tokenizer(LLAMA_TOKENIZER)
    assert (tok.bos_id, tok.eos_id, tok.eot_id, tok.n_words) == (1, 2, 32000, 32001)
    assert tok.encode("plan a trip") == [3814, 263, 17487]  # '▁plan', '▁a', '▁trip' in LLaMA's vocabulary
    ids, mask = tok.encode_dialogue(["plan a trip", "Go to Rome."])
    assert ids[:5] == [1, 3814, 263, 17487, 32000] and ids[-1] == 32000 and 2 not in ids
    assert mask == [False] * 5 + [True] * (len(ids) - 5)
    assert tok.decode(ids) == "plan a trip Go to Rome."


def test_tokenizer_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer model not found"):
        Tokenizer(tmp_path / "tokenizer.model")
