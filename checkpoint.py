"""
Every file of weights and state lima reads or writes:
- in: a LLaMA directory in Meta's layout (params.json, consolidated.NN.pth) or Hugging Face's
  (config.json, safetensors or .bin), as a Transformer (load_model);
- out: a fine-tuned epoch as a Hugging Face LLaMA directory, each rank writing its own rows of the
  weights (save_epoch);
- the resume state of a run, in and out (torch.distributed.checkpoint, with run.json beside it);
- a run's ownership of its --out (a lock file).
Every problem with a file is a CheckpointError whose message names the file and what is wrong.
"""
import fcntl
import hashlib
import json
import logging
import math
import os
import pickle
import shutil
from dataclasses import fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from model import ModelArgs, Transformer


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the file and what is wrong with it."""


# -----------------------------------------------------------------------------
# In: Meta's layout or Hugging Face's

# Meta's model-parallel layout: the dim each weight was split on across consolidated.NN.pth
# (norms are copied whole to every shard)
META_SPLIT_DIM = dict(wq=0, wk=0, wv=0, w1=0, w3=0, output=0, wo=1, w2=1, tok_embeddings=1)
HF_NAMES = {  # Hugging Face's module names -> Meta's
    "model.layers": "layers",
    "model.embed_tokens": "tok_embeddings",
    "model.norm": "norm",
    "lm_head": "output",
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
# The longest context a config may declare. LLaMA's longest is 2^17 (Llama 3.1's); longer is
# damage, not a model: make_cache allocates a causal mask of its square (1 TiB of bools at 2^20)
MAX_POSITIONS = 1 << 20


def load_model(path, vocab_size: int | None = None, dtype=None, dropout: float = 0.0):
    """A LLaMA directory memory-mapped into a model built on the meta device: never a second copy.
    vocab_size is the tokenizer's: a base LLaMA (one token short) grows by EOT (LIMA §2)."""
    args, state_dict = load_checkpoint(path)
    if vocab_size is not None and args.vocab_size not in (vocab_size - 1, vocab_size):
        raise CheckpointError(
            f"{path} has {args.vocab_size} tokens, expected {vocab_size - 1} (a base LLaMA) or "
            f"{vocab_size} (with EOT): it was not trained with this tokenizer")
    args.dropout = dropout
    dtype = dtype or next(iter(state_dict.values())).dtype
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict({k: v.to(dtype) for k, v in state_dict.items()}, assign=True)
    if vocab_size is not None and vocab_size != args.vocab_size:
        model.grow_vocab(vocab_size)
    return model


def load_checkpoint(path) -> tuple:
    """(ModelArgs, state dict in Meta's names) of a LLaMA directory, keys and shapes checked by
    load_state_dict. Meta's model-parallel shards are joined with one cat per weight."""
    path = Path(path)
    try:  # a file or directory that cannot be read, wherever it is: its OSError names it
        if not path.is_dir():
            raise CheckpointError(f"{path}: no such checkpoint directory")
        names = os.listdir(path)  # an unreadable directory raises here: glob would find nothing
        if "params.json" in names:
            model, files = meta_layout(path)  # on the meta device: shapes only
        elif "config.json" in names:
            model, files = hf_layout(path)
        else:
            raise CheckpointError(
                f"{path}: neither params.json (Meta layout) nor config.json (Hugging Face)")
        head_dim = model.args.head_dim
        shapes = {name: tensor.shape for name, tensor in model.state_dict().items()}
        # Meta's shards are mapped one at a time and copied out to be joined; one file stays mapped
        copy = len(files) > 1 and "params.json" in names
        pieces = {}  # Meta's name -> (file, tensor) of each shard that holds the weight
        for file in files:
            for name, tensor in load_tensors(file).items():
                if name.endswith(("rope.freqs", "rotary_emb.inv_freq")):  # recomputed, not learned
                    continue
                meta_name = hf_name(name, to_hf=False)
                expected = shapes.get(meta_name)  # unexpected keys: load_state_dict names them
                if expected is not None and tensor.dim() != len(expected):
                    raise CheckpointError(f"{file}: {name} has shape {tuple(tensor.shape)}, "
                                          f"expected a {len(expected)}-D weight")
                if name.endswith(("q_proj.weight", "k_proj.weight")):
                    tensor = hf_rotary_order(tensor, head_dim, to_hf=False)
                if copy:
                    tensor = tensor.clone()
                pieces.setdefault(meta_name, []).append((file, tensor))
        state_dict = {}
        for name in list(pieces):  # pop: each weight's pieces are freed once joined
            shard_files, parts = zip(*pieces.pop(name))
            dim = META_SPLIT_DIM.get(name.removesuffix(".weight").split(".")[-1])
            if dim is None:  # replicated: every shard holds the same copy
                for file, part in zip(shard_files[1:], parts[1:]):
                    if not torch.equal(part, parts[0]):
                        raise CheckpointError(
                            f"{path}: {name} differs between {shard_files[0].name} and "
                            f"{file.name}, expected copies (a replicated weight: every shard "
                            "holds it whole)")
                state_dict[name] = parts[0]
            elif len(parts) == 1:
                state_dict[name] = parts[0]
            else:
                state_dict[name] = torch.cat(parts, dim)
        model.load_state_dict(state_dict, strict=True, assign=True)
    except OSError as e:
        raise CheckpointError(f"{e.filename or path}: cannot be read ({e.strerror or e})") from None
    except RuntimeError as e:  # shards that do not fit, missing or unexpected keys, wrong shapes
        raise CheckpointError(f"{path}: {' '.join(str(e).split())}") from None
    return model.args, state_dict


def read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None


def load_tensors(file: Path) -> dict:
    """The tensors of a .pth or .bin file (weights only) or a .safetensors file, memory-mapped."""
    file.open("rb").close()  # unreadable: an OSError naming it, not the readers' own words for it
    if file.suffix != ".safetensors":
        try:
            tensors = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # truncated zip, pickle of arbitrary objects, ...
            raise CheckpointError(f"{file}: cannot be read as a weights-only checkpoint "
                                  f"({' '.join(str(e).split())})") from None
        expected = "expected a dict of weight names to tensors"
        if not isinstance(tensors, dict):
            raise CheckpointError(
                f"{file}: holds an object of type {type(tensors).__name__}, {expected}")
        for name, tensor in tensors.items():
            if not isinstance(name, str):
                raise CheckpointError(
                    f"{file}: holds the key {name!r} of type {type(name).__name__}, {expected}")
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointError(
                    f"{file}: holds {name} of type {type(tensor).__name__}, {expected}")
        return tensors
    try:
        from safetensors import safe_open
    except ImportError:
        raise CheckpointError(
            f"{file}: reading it needs the safetensors package (pip install safetensors)") from None
    try:
        with safe_open(file, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # a header that lies about shapes, offsets or dtypes
        raise CheckpointError(
            f"{file}: not a valid safetensors file ({' '.join(str(e).split())})") from None


def positive(config: dict, name: str, default=None, real=False, most=math.inf):
    """config[name] (or default where it is absent; a KeyError where there is none), unless it is
    not a positive int (any number, with real) no larger than most: a ValueError naming it."""
    value = config[name] if default is None else config.get(name, default)
    if real:
        kinds, kind = (int, float), "number"
    else:
        kinds, kind = (int,), "int"
    # NaN and infinities fail the comparison; True is an int to Python, not to a config
    if isinstance(value, bool) or not isinstance(value, kinds) or not 0 < value <= most:
        at_most = f" of at most {most}" if most < math.inf else ""
        raise ValueError(f"{name} is {value!r}, expected a positive {kind}{at_most}")
    return value


def check_heads(config: dict, dim: str, heads: str, kv_heads: str):
    """Refuse (a ValueError naming the fields) heads that do not split the width into heads of an
    even size, or key/value heads that do not divide the heads."""
    width, n_heads, n_kv_heads = config[dim], config[heads], config.get(kv_heads)
    if width % n_heads:
        raise ValueError(f"{dim} {width} is not a multiple of {heads} {n_heads}")
    if width // n_heads % 2:
        raise ValueError(
            f"{dim} {width} / {heads} {n_heads}: an odd head size (RoPE rotates pairs)")
    if n_kv_heads is not None and n_heads % n_kv_heads:
        raise ValueError(f"{kv_heads} {n_kv_heads} does not divide {heads} {n_heads} (each "
                         "key/value head serves as many queries)")


def meta_layout(path: Path) -> tuple:
    """The model (on the meta device) that Meta's params.json describes, and its shards."""
    params = read_json(path / "params.json")
    files = sorted(path.glob("consolidated.*.pth"))
    if not files:
        raise CheckpointError(f"{path}: params.json but no consolidated.NN.pth shard")
    embedding = load_tensors(files[0]).get("tok_embeddings.weight")
    if embedding is None:
        raise CheckpointError(f"{files[0]}: no tok_embeddings.weight")
    if embedding.dim() != 2:
        raise CheckpointError(f"{files[0]}: tok_embeddings.weight has shape "
                              f"{tuple(embedding.shape)}, expected a 2-D weight")
    known = {f.name for f in fields(ModelArgs)}
    try:
        vocab_size = params.get("vocab_size", -1)
        if isinstance(vocab_size, int) and vocab_size <= 0:  # Meta's -1: the tokenizer decides
            params["vocab_size"] = embedding.shape[0]
        args = ModelArgs(**{k: v for k, v in params.items() if k in known})
        values = vars(args)  # params.json's names are ModelArgs' own
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of"):
            positive(values, name)
        for name in ("norm_eps", "rope_theta"):
            positive(values, name, real=True)
        positive(values, "max_seq_len", most=MAX_POSITIONS)
        if args.n_kv_heads is not None:
            positive(values, "n_kv_heads")
        if args.ffn_dim_multiplier is not None:
            positive(values, "ffn_dim_multiplier", real=True)
        check_heads(values, "dim", "n_heads", "n_kv_heads")
        n_shards = args.dim // embedding.shape[1]  # the embedding is split on dim 1
        with torch.device("meta"):
            model = Transformer(args)
    except (AttributeError, TypeError, ValueError, ZeroDivisionError, RuntimeError) as e:
        raise CheckpointError(f"{path / 'params.json'}: not LLaMA's parameters ({e})") from None
    files = [path / f"consolidated.{i:02d}.pth" for i in range(n_shards)]
    for file in files:
        if not file.exists():
            raise CheckpointError(f"{file}: missing shard (the weights are split {n_shards} ways)")
    return model, files


def hf_args(config: dict) -> ModelArgs:
    """ModelArgs of a Hugging Face LLaMA config.json, each value checked as it is read (a
    KeyError or ValueError names the field)."""
    # RoPE's base: at the top level or in rope_parameters (transformers 5); plain RoPE only
    rope_parameters = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    for name, value in (("rope_parameters", rope_parameters), ("rope_scaling", scaling)):
        if not isinstance(value, dict):
            raise ValueError(f"{name} is {value!r}, expected an object")
    for kind in (rope_parameters.get("rope_type"), scaling.get("rope_type"), scaling.get("type")):
        if kind not in (None, "default"):
            raise ValueError(f"RoPE scaling {kind!r} is not implemented")
    if config.get("rope_theta") is None:
        rope_theta = positive(rope_parameters, "rope_theta", 10000.0, real=True)
    else:
        rope_theta = positive(config, "rope_theta", real=True)
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "vocab_size"):
        positive(config, name)
    if config.get("num_key_value_heads") is not None:
        positive(config, "num_key_value_heads")
    check_heads(config, "hidden_size", "num_attention_heads", "num_key_value_heads")
    dim, hidden = config["hidden_size"], config["intermediate_size"]
    return ModelArgs(
        dim=dim,
        n_layers=config["num_hidden_layers"],
        n_heads=config["num_attention_heads"],
        n_kv_heads=config.get("num_key_value_heads"),
        vocab_size=config["vocab_size"],
        # HF stores the SwiGLU width itself; these two reproduce it through Meta's rounding rule
        multiple_of=hidden,
        ffn_dim_multiplier=hidden / int(2 * 4 * dim / 3),
        norm_eps=positive(config, "rms_norm_eps", 1e-6, real=True),
        rope_theta=rope_theta,
        max_seq_len=positive(config, "max_position_embeddings", 2048, most=MAX_POSITIONS),
    )


def hf_layout(path: Path) -> tuple:
    """The model (on the meta device) that Hugging Face's config.json describes, and its files."""
    config_file = path / "config.json"
    config = read_json(config_file)
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file}: holds a JSON {type(config).__name__}, expected a "
                              "LLaMA config (an object)")
    try:
        args = hf_args(config)
        with torch.device("meta"):
            model = Transformer(args)
    except KeyError as e:
        raise CheckpointError(f"{config_file}: no {e.args[0]!r}, expected a LLaMA config") from None
    except (TypeError, ValueError, ZeroDivisionError, RuntimeError) as e:
        raise CheckpointError(f"{config_file}: not a LLaMA config ({e})") from None
    for index in (path / "model.safetensors.index.json", path / "pytorch_model.bin.index.json"):
        if index.exists():
            return model, indexed_files(index)
    files = sorted(path.glob("model*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(
            f"{path}: config.json but no model*.safetensors or pytorch_model*.bin")
    return model, files


def indexed_files(index: Path) -> list:
    """The weight files an index.json lists, each checked to exist."""
    try:
        files = sorted({index.parent / name for name in read_json(index)["weight_map"].values()})
    except (KeyError, TypeError, AttributeError):
        raise CheckpointError(
            f'{index}: expected a "weight_map" of weight names to files') from None
    for file in files:
        if not file.exists():
            raise CheckpointError(f"{file}: missing shard listed in {index}")
    return files


def hf_name(name: str, to_hf: bool) -> str:
    """Hugging Face's name for a weight -> Meta's, or back with to_hf
    (model.layers.3.self_attn.q_proj.weight <-> layers.3.attention.wq.weight)."""
    name = f".{name}"  # whole module names only, between dots: norm is not attention_norm's end
    for hf, meta in HF_NAMES.items():
        if to_hf:
            name = name.replace(f".{meta}.", f".{hf}.")
        else:
            name = name.replace(f".{hf}.", f".{meta}.")
    return name[1:]


def hf_rotary_order(w, head_dim: int, to_hf: bool):
    """Meta's q/k rows rotate pairs (2i, 2i+1) of each head, Hugging Face's rotate halves
    (i, i + head_dim/2): reorder the rows of every head from one order to the other."""
    if to_hf:
        halves = (head_dim // 2, 2)
    else:
        halves = (2, head_dim // 2)
    return w.reshape(-1, *halves, w.shape[-1]).transpose(1, 2).reshape(w.shape)


# -----------------------------------------------------------------------------
# Out: a fine-tuned epoch as a Hugging Face LLaMA directory

def hf_tokenizer(tokenizer) -> dict:
    """tokenizer.json: LLaMA's SentencePiece model as Hugging Face's BPE, EOT an added special
    token. It spares transformers a protobuf-based conversion of tokenizer.model."""
    sp = tokenizer.sp
    bos, unk = sp.id_to_piece(tokenizer.bos_id), sp.id_to_piece(sp.unk_id())
    specials = {i: sp.id_to_piece(i) for i in range(tokenizer.eot_id)
                if sp.is_control(i) or sp.is_unknown(i)}
    specials[tokenizer.eot_id] = "<EOT>"
    added = [dict(id=i, content=text, single_word=False, lstrip=False, rstrip=False,
                  normalized=False, special=True) for i, text in specials.items()]
    vocab = {sp.id_to_piece(i): i for i in range(tokenizer.eot_id)}
    # BPE merges: every split of a piece into two pieces, ranked by the piece's score
    merges = []
    for piece, i in vocab.items():
        for k in range(1, len(piece)):
            if piece[:k] in vocab and piece[k:] in vocab:
                merges.append((-sp.get_score(i), i, k, piece[:k], piece[k:]))
    merges.sort()
    space = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
    unspace = {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}
    bos_first = [{"SpecialToken": {"id": bos, "type_id": 0}},
                 {"Sequence": {"id": "A", "type_id": 0}}]
    pair = [*bos_first, {"Sequence": {"id": "B", "type_id": 1}}]
    bos_entry = {"id": bos, "ids": [tokenizer.bos_id], "tokens": [bos]}
    # SentencePiece's dummy prefix before every text, also after BOS and EOT, as encode_dialogue
    prepend = {"type": "Prepend", "prepend": "\u2581"}
    strip = {"type": "Strip", "content": " ", "start": 1, "stop": 0}
    decoders = [unspace, {"type": "ByteFallback"}, {"type": "Fuse"}, strip]
    return {
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [prepend, space]},
        "post_processor": {"type": "TemplateProcessing", "single": bos_first, "pair": pair,
                           "special_tokens": {bos: bos_entry}},
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "unk_token": unk, "fuse_unk": True, "byte_fallback": True,
                  "vocab": vocab, "merges": [m[3:] for m in merges]},
    }


def hf_files(args: ModelArgs, tokenizer) -> dict:
    """config.json, generation_config.json and the tokenizer's files (as JSON objects) of a LIMA
    model. EOT is an added special token and the end-of-sequence token, so transformers, vLLM and
    llama.cpp stop where sample.py does."""
    tokenizer_json = hf_tokenizer(tokenizer)
    bos = tokenizer.sp.id_to_piece(tokenizer.bos_id)
    unk = tokenizer.sp.id_to_piece(tokenizer.sp.unk_id())
    names = {"bos_token": bos, "eos_token": "<EOT>", "unk_token": unk}
    added = {}
    for token in tokenizer_json["added_tokens"]:
        added[str(token["id"])] = {k: v for k, v in token.items() if k != "id"}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **names,
        "added_tokens_decoder": added,
        # LIMA §2: BOS, then every turn followed by EOT, no role tags; a prompt ends after its EOT
        "chat_template": (
            "{{ bos_token }}{% for m in messages %}{{ m['content'] }}<EOT>{% endfor %}"),
    }
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "tie_word_embeddings": False,
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads or args.n_heads,
        "vocab_size": args.vocab_size,
        "hidden_act": "silu",
        "rms_norm_eps": args.norm_eps,
        "max_position_embeddings": args.max_seq_len,
        "rope_theta": args.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eot_id,
        "torch_dtype": "bfloat16",
    }
    generation = {  # LIMA §2's decoding
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eot_id,
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.9,
        "repetition_penalty": 1.2,
        "top_k": 0,  # off: transformers would otherwise apply its top-k 50 before the nucleus
        "max_new_tokens": 2048,
    }
    return {
        "config.json": config,
        "generation_config.json": generation,
        "tokenizer.json": tokenizer_json,
        "tokenizer_config.json": tokenizer_config,
        "special_tokens_map.json": names,
        "added_tokens.json": {"<EOT>": tokenizer.eot_id},
    }


def safetensors_layout(state: dict, max_bytes=5e9) -> dict:
    """File name -> {weight name: its safetensors header entry}, bf16, files of <= max_bytes."""
    files, at = [{}], 0
    for name, tensor in state.items():
        size = 2 * tensor.numel()
        if at and at + size > max_bytes:
            files.append({})
            at = 0
        files[-1][name] = dict(dtype="BF16", shape=[*tensor.shape], data_offsets=[at, at + size])
        at += size
    n = len(files)
    return {f"model-{i + 1:05d}-of-{n:05d}.safetensors": e for i, e in enumerate(files)}


def write_weights(directory: Path, model, head_dim: int, rank: int, world: int) -> dict:
    """The model's weights in bf16 with Hugging Face's names and q/k order, in safetensors files.
    Each rank writes its own rows of every weight (FSDP2 shards dim 0 as torch.chunk does) where
    they go in the files: no rank holds more than its shard and one q/k matrix, gathered because
    HF's order moves rows across shards. Returns the index (model.safetensors.index.json)."""
    state = {hf_name(k, to_hf=True): v for k, v in model.state_dict().items()}
    files = safetensors_layout(state)
    for name, entries in files.items():
        header = json.dumps({**entries, "__metadata__": {"format": "pt"}}).encode()
        header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned
        data_start = 8 + len(header)
        if rank == 0:
            (directory / name).write_bytes(len(header).to_bytes(8, "little") + header)
        if world > 1:
            dist.barrier()  # the file exists
        with open(directory / name, "r+b") as f:
            for key, entry in entries.items():
                weight = state[key].to(torch.bfloat16)  # this rank's part only, if sharded
                if key.endswith(("q_proj.weight", "k_proj.weight")):
                    if isinstance(weight, DTensor):
                        weight = weight.full_tensor()
                    weight = hf_rotary_order(weight, head_dim, to_hf=True)
                rows = math.ceil(weight.shape[0] / world)
                if isinstance(weight, DTensor):
                    mine = weight.to_local()
                else:
                    mine = weight[rank * rows : (rank + 1) * rows]
                row_bytes = 2 * math.prod(weight.shape[1:])
                f.seek(data_start + entry["data_offsets"][0] + rank * rows * row_bytes)
                f.write(mine.cpu().contiguous().view(torch.uint8).numpy())
            f.flush()
            os.fsync(f.fileno())
    if world > 1:
        dist.barrier()  # every rank's rows are on disk
    total = 2 * sum(v.numel() for v in state.values())
    weight_map = {key: name for name, entries in files.items() for key in entries}
    return {"metadata": {"total_size": total}, "weight_map": weight_map}


def swap_into_place(tmp: Path, final: Path):
    """tmp renamed to final; an existing final is replaced in two renames, so a kill between them
    leaves the old one whole, under .old_NAME."""
    old = final.with_name(f".old_{final.name}")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def save_epoch(out: Path, epoch: int, model, tokenizer, tokenizer_file: Path, samples: list,
               rank: int, world: int):
    """OUT/epoch_NN/: a Hugging Face LLaMA directory (transformers, vLLM, llama.cpp's converter and
    sample.py load it) with samples.jsonl beside it. Written as .tmp_epoch_NN/ by every rank, then
    renamed by rank 0: a kill never leaves a half-written epoch_NN/."""
    tmp, final = out / f".tmp_epoch_{epoch:02d}", out / f"epoch_{epoch:02d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    try:
        index = write_weights(tmp, model, model.args.head_dim, rank, world)
        if rank != 0:
            return
        files = {**hf_files(model.args, tokenizer), "model.safetensors.index.json": index}
        for name, obj in files.items():
            (tmp / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False))
        shutil.copy(tokenizer_file, tmp / "tokenizer.model")
        (tmp / "samples.jsonl").write_text("".join(json.dumps(row) + "\n" for row in samples))
    except OSError as e:  # a full disk: the half-written epoch goes, what was there stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"{tmp}: cannot write epoch {epoch} ({e.strerror}); everything in "
                              f"{out} is as before it") from None
    swap_into_place(tmp, final)


# -----------------------------------------------------------------------------
# The resume state: OUT/resume/step_N/ (DCP's shards, weights and AdamW state) and run.json

class MetadataUnpickler(pickle.Unpickler):
    """DCP's .metadata is a pickle: this one builds DCP's records and torch types, nothing else."""

    def find_class(self, module, name):
        allowed = ("torch.Size", "torch.serialization._get_layout", "pathlib.PosixPath",
                   "torch.distributed.checkpoint.filesystem._StorageInfo")
        is_record = module == dcp.metadata.__name__ and (
            name in dcp.metadata.__all__ or name == "_MEM_FORMAT_ENCODING")
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if is_record or is_dtype or f"{module}.{name}" in allowed:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} has no place in a checkpoint's metadata")


class TensorsOnlyReader(dcp.FileSystemReader):
    """DCP's reader, less what it would unpickle: an entry stored as "bytes" is dropped."""

    def read_metadata(self, *args, **kwargs):
        with open(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
            metadata = MetadataUnpickler(f).load()
        entries = metadata.state_dict_metadata
        bytes_entry = dcp.metadata.BytesStorageMetadata
        metadata.state_dict_metadata = {
            k: v for k, v in entries.items() if not isinstance(v, bytes_entry)}
        return metadata


def file_sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def gathered(share: list, world: int) -> list:
    """Every rank's share, concatenated in rank order, on every rank."""
    shares = [share] * world
    if world > 1:
        dist.all_gather_object(shares, share)
    return [item for rank_share in shares for item in rank_share]


def verify_resume(state_dir: Path, rank: int, world: int):
    """Refuse a state whose files changed since they were saved: each rank hashes its share of the
    files that sha256.json lists (a state saved before it was written has none: not checked)."""
    sums_file = state_dir / "sha256.json"
    if not sums_file.exists():
        return
    sums = read_json(sums_file)
    names = sorted(sums)
    changed = [name for name in names[rank::world]
               if not (state_dir / name).is_file() or file_sha256(state_dir / name) != sums[name]]
    changed = gathered(changed, world)
    if changed:
        raise CheckpointError(f"{state_dir / changed[0]}: its bytes differ from those saved (its "
                              "SHA-256 is not sha256.json's): the resume state is damaged")


def latest_resume(out: Path) -> Path | None:
    return max((out / "resume").glob("step_*"), default=None)


def check_resume(state_dir: Path, run: dict, data_dir: Path):
    """Refuse a resume whose run.json differs from this run's settings, naming the first change."""
    try:
        saved = json.loads((state_dir / "run.json").read_text())
        saved.setdefault("dtype", run["dtype"])  # not recorded before: taken as the same
        changed = next((k for k in run if saved[k] != run[k]), None)
        model_diff = [f"{k} {v}, not {run['model'].get(k)}"
                      for k, v in saved["model"].items() if v != run["model"].get(k)]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise CheckpointError(
            f"{state_dir} is not a resume state written by this train.py ({e!r})") from None
    if changed is None:
        return
    if changed == "data":
        why = f"other data than --data {data_dir} (its train.pt and dev.pt differ)"
    elif changed == "model":
        why = f"another model: {', '.join(model_diff)}"
    else:
        why = f"--{changed} {saved[changed]}, not {run[changed]}"
    raise CheckpointError(
        f"{state_dir} was trained with {why}; resume with the same settings, or give a fresh --out")


def load_resume(state_dir: Path, model, optimizer, rank: int, world: int):
    """Weights and AdamW state from state_dir, resharded to this run's processes, once its files
    are verified. Only tensors are read: the param groups (pickled, "bytes") are what the flags
    give."""
    verify_resume(state_dir, rank, world)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": {"state": optim_state["state"]}}
    logging.disable(logging.WARNING)  # DCP logs a failed read's traceback, then raises
    try:
        dcp.load(state, storage_reader=TensorsOnlyReader(state_dir))
    except dcp.CheckpointException as e:  # one rank's failure, as that rank raised it
        first = next(iter(e.failures.values()))[0]
        raise CheckpointError(f"{state_dir} cannot be loaded ({first!r})") from None
    except Exception as e:  # damaged, foreign or hostile
        raise CheckpointError(f"{state_dir} cannot be loaded ({e!r})") from None
    finally:
        logging.disable(logging.NOTSET)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)


def save_resume(out: Path, step: int, model, optimizer, run: dict, rank: int, world: int):
    """OUT/resume/step_N/: each rank writes its shards under a temporary name and hashes them;
    rank 0 adds sha256.json and run.json and renames it into place (a new name: one atomic
    rename), then removes the older states."""
    model_state, optim_state = get_state_dict(model, optimizer)
    tmp, final = out / "resume" / f".tmp_step_{step:06d}", out / "resume" / f"step_{step:06d}"
    try:
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)
    except (OSError, dcp.CheckpointException) as e:  # a full disk, on this rank or another
        if isinstance(e, dcp.CheckpointException):
            e = next(iter(e.failures.values()))[0]
        while e.__context__ is not None and not isinstance(e, OSError):  # torch.save's own error
            e = e.__context__  # hides the OSError it met
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        reason = getattr(e, "strerror", None) or repr(e)
        message = (f"{tmp}: cannot write the resume state ({reason}); the last one in "
                   f"{out / 'resume'} stays: free space and rerun with --resume")
        raise CheckpointError(message) from None
    mine = sorted(tmp.glob(f"__{rank}_*.distcp"))  # DCP's names for rank r's files
    sums = gathered([(f.name, file_sha256(f)) for f in mine], world)
    if rank != 0:
        return
    sums.append((".metadata", file_sha256(tmp / ".metadata")))
    (tmp / "sha256.json").write_text(json.dumps(dict(sums), indent=1))
    (tmp / "run.json").write_text(json.dumps(run))
    tmp.rename(final)
    for old in (out / "resume").iterdir():
        if old != final:
            shutil.rmtree(old)


# -----------------------------------------------------------------------------
# A run owns its --out

def check_out_is_free(out: Path, resume: bool):
    """A fresh run never writes over another's log, resume state or epochs."""
    if resume:
        return
    if any(any(out.glob(name)) for name in ("log.jsonl", "resume", "epoch_*")):
        raise CheckpointError(
            f"--out {out} holds another run (log.jsonl, resume/, epoch_NN/): continue it with "
            "--resume, or give a fresh --out")


def trim_log(out: Path, step: int, steps_per_epoch: int):
    """OUT/log.jsonl of a run resumed at step, less what it logged after that step's state was
    saved (a run killed in between): the steps it will now redo are logged once."""
    log = out / "log.jsonl"
    kept = []
    for line in log.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # cut short by the kill
            continue
        if "step" in row and row["step"] > step:
            continue
        if "dev_loss" in row and row["epoch"] * steps_per_epoch > step:  # an epoch's end
            continue
        kept.append(line + "\n")
    tmp = out / ".log.jsonl.tmp"
    tmp.write_text("".join(kept))
    tmp.rename(log)


def lock_out(out: Path):
    """OUT/.lock, held while the returned file stays open: a second train.py there is refused."""
    out.mkdir(parents=True, exist_ok=True)
    lock = open(out / ".lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise CheckpointError(
            f"--out {out}: another train.py is writing there (it holds {out / '.lock'}); wait for "
            "it or give another --out") from None
    return lock
