"""
The LLaMA model (Touvron et al., 2023) as LIMA fine-tunes it, its tokenizer with LIMA's end-of-turn token,
checkpoint loading (Meta and Hugging Face layouts) and LIMA's sampler. Parameter names match Meta's release,
so a checkpoint loads with a plain load_state_dict.
"""
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # < n_heads: grouped-query attention (Llama-2 34B/70B)
    vocab_size: int = 32000
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    dropout: float = 0.0  # residual dropout at the top layer, 0.0 at the bottom (LIMA §3)

    @classmethod
    def from_size(cls, name: str, **overrides) -> "ModelArgs":
        """LLaMA-1's shapes (Touvron et al., 2023, Table 2) and a CPU-sized demo."""
        sizes = {
            "tiny": dict(dim=256, n_layers=4, n_heads=4, multiple_of=32),
            "7B": dict(dim=4096, n_layers=32, n_heads=32),
            "13B": dict(dim=5120, n_layers=40, n_heads=40),
            "33B": dict(dim=6656, n_layers=60, n_heads=52),
            "65B": dict(dim=8192, n_layers=80, n_heads=64)}
        sizes["30B"] = sizes["33B"]  # Meta's release calls 33B "30B"
        if name not in sizes:
            raise ValueError(f"unknown size {name!r}, expected one of {', '.join(sizes)}")
        return cls(**{**sizes[name], **overrides})

    @property
    def hidden_dim(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)  # SwiGLU keeps the FLOPs of a 4*dim ReLU MLP
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # in float32: bf16 sums of squares lose too much precision
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope(head_dim: int, positions, theta: float) -> tuple:
    """cos and sin of the angles pos * theta^(-2i/head_dim), float32, shape (*positions.shape, head_dim/2)."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[..., None] * freqs
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each pair (x[2i], x[2i+1]) of every head by its angle; x is (B, heads, T, head_dim)."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads or args.n_heads
        self.head_dim = args.dim // args.n_heads
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, mask=None, cache=None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # decoding: keys and values go to row r's positions pos[r], read whole
            cache_k, cache_v, rows, pos = cache
            cache_k[rows, :, pos], cache_v[rows, :, pos] = k.transpose(1, 2), v.transpose(1, 2)
            k, v = cache_k, cache_v
        # grouped-query: each key/value head serves n_heads/n_kv_heads queries
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                             enable_gqa=self.n_kv_heads < self.n_heads)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # SwiGLU (Shazeer, 2020)


class Block(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        # LIMA §3: residual dropout rises linearly from 0.0 at the bottom layer to args.dropout at the top
        self.dropout = args.dropout * layer_id / max(1, args.n_layers - 1)

    def forward(self, x, cos, sin, mask=None, cache=None):
        h = x + F.dropout(self.attention(self.attention_norm(x), cos, sin, mask, cache), self.dropout,
                          self.training)
        return h + F.dropout(self.feed_forward(self.ffn_norm(h)), self.dropout, self.training)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        weight = torch.empty(args.vocab_size, args.dim)  # set below: Embedding's own init on meta is slow
        self.tok_embeddings = nn.Embedding.from_pretrained(weight, freeze=False)
        self.layers = nn.ModuleList(Block(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        for module in self.modules():  # only matters for a model trained from scratch (tiny)
            if isinstance(module, (nn.Linear, nn.Embedding)) and not module.weight.is_meta:
                nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, tokens, cache=None, pos=None):
        """tokens (B, T) -> logits (B, T, vocab), each token attending to those before it. Decoding: their
        keys and values are written into cache (make_cache) at their positions pos (B, T)."""
        h, mask = self.tok_embeddings(tokens), None
        if cache is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
            cos, sin = rope(self.args.dim // self.args.n_heads, positions, self.args.rope_theta)
        else:  # rows of the tables made once per cache
            cos, sin, mask = (cache[table][pos][:, None] for table in ("cos", "sin", "causal"))
            rows = torch.arange(tokens.shape[0], device=tokens.device)[:, None]  # once, not in every layer
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, mask, None if cache is None else (cache["k"][i], cache["v"][i], rows, pos))
        return self.output(self.norm(h))

    def make_cache(self, batch_size: int, max_len: int, dtype=None) -> dict:
        """Each layer's keys and values for decoding up to max_len positions (prompt included), and the RoPE
        angles (float32, whatever the model's dtype) and causal mask of those positions. A plain argument
        of forward, not the model's state: a compiled step reads whichever cache it is given."""
        p, head_dim = self.output.weight, self.args.dim // self.args.n_heads
        shape = (batch_size, self.args.n_kv_heads or self.args.n_heads, max_len, head_dim)
        zeros = lambda: [torch.zeros(shape, dtype=dtype or p.dtype, device=p.device) for _ in self.layers]
        positions = torch.arange(max_len, device=p.device)
        cos, sin = rope(head_dim, positions, self.args.rope_theta)
        return dict(k=zeros(), v=zeros(), cos=cos, sin=sin, causal=positions[None, :] <= positions[:, None])

    @torch.no_grad()
    def grow_vocab(self, vocab_size: int):
        """Rows for new tokens (LIMA's EOT), each the mean of the old rows: an 'average' token, not noise."""
        old = self.args.vocab_size
        for module in (self.tok_embeddings, self.output):
            w = module.weight
            new = w.mean(0, keepdim=True, dtype=torch.float32).to(w.dtype).expand(vocab_size - old, -1)
            module.weight = nn.Parameter(torch.cat([w, new]), requires_grad=w.requires_grad)
        self.tok_embeddings.num_embeddings = self.output.out_features = self.args.vocab_size = vocab_size

    @classmethod
    def from_pretrained(cls, path, vocab_size: int | None = None, dtype=None, dropout: float = 0.0):
        """A LLaMA directory (load_checkpoint) memory-mapped into a model built on the meta device: never a
        second copy. vocab_size is the tokenizer's: a base LLaMA (one token short) grows by EOT."""
        args, state_dict = load_checkpoint(path)
        if vocab_size is not None and args.vocab_size not in (vocab_size - 1, vocab_size):
            raise CheckpointError(f"{path} has {args.vocab_size} tokens, expected {vocab_size - 1} (a base "
                                  f"LLaMA) or {vocab_size} (with EOT): it was not trained with this "
                                  "tokenizer")
        args.dropout = dropout
        dtype = dtype or next(iter(state_dict.values())).dtype
        with torch.device("meta"):
            model = cls(args)
        model.load_state_dict({k: v.to(dtype) for k, v in state_dict.items()}, assign=True)
        if vocab_size is not None and vocab_size != args.vocab_size:
            model.grow_vocab(vocab_size)
        return model


# -----------------------------------------------------------------------------
# Checkpoints: Meta's layout (params.json, consolidated.NN.pth) or Hugging Face's (config.json, weights)

class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the file and what is wrong with it."""


# Meta's model-parallel layout: the dim each weight was split on across consolidated.NN.pth (norms are copied)
META_SPLIT_DIM = dict(wq=0, wk=0, wv=0, w1=0, w3=0, output=0, wo=1, w2=1, tok_embeddings=1)
HF_NAMES = {  # Hugging Face's module names -> Meta's
    "model.layers": "layers", "model.embed_tokens": "tok_embeddings", "model.norm": "norm",
    "lm_head": "output", "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3", "mlp.down_proj": "feed_forward.w2",
    "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}


def load_checkpoint(path) -> tuple:
    """(ModelArgs, state dict in Meta's names) of a LLaMA directory, keys and shapes checked by
    load_state_dict. Meta's model-parallel shards are joined with one cat per weight."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    meta = (path / "params.json").exists()
    if not meta and not (path / "config.json").exists():
        raise CheckpointError(f"{path}: neither params.json (Meta layout) nor config.json (Hugging Face)")
    model, files = _meta_layout(path) if meta else _hf_layout(path)  # on the meta device: shapes only
    args = model.args
    # Meta's shards are mapped one at a time and copied out to be joined; other files stay memory-mapped
    pieces, copy = {}, meta and len(files) > 1
    try:  # shards that do not fit together, missing or unexpected keys, wrong shapes: PyTorch names them
        for file in files:
            for name, tensor in _load_file(file).items():
                if name.endswith(("q_proj.weight", "k_proj.weight")):
                    tensor = hf_rotary_order(tensor, args.dim // args.n_heads, to_hf=False)
                if not name.endswith(("rope.freqs", "rotary_emb.inv_freq")):  # recomputed, not learned
                    pieces.setdefault(_hf_name(name), []).append(tensor.clone() if copy else tensor)
        state_dict = {}
        for name in list(pieces):  # pop: each weight's pieces are freed once joined
            parts, dim = pieces.pop(name), META_SPLIT_DIM.get(name.split(".")[-2])
            state_dict[name] = parts[0] if len(parts) == 1 or dim is None else torch.cat(parts, dim)
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: {' '.join(str(e).split())}") from None
    return args, state_dict


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None


def _load_file(file: Path) -> dict:
    """The tensors of a .pth or .bin file (weights only) or of a .safetensors file, both memory-mapped."""
    if file.suffix != ".safetensors":
        try:
            return torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # truncated zip, pickle of arbitrary objects, ...
            raise CheckpointError(f"{file}: cannot be read as a weights-only checkpoint ({e})") from None
    try:
        from safetensors import safe_open
        with safe_open(file, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except ImportError:
        raise CheckpointError(f"{file}: reading it needs the safetensors package (pip install "
                              "safetensors)") from None
    except Exception as e:  # a header that lies about shapes, offsets or dtypes
        raise CheckpointError(f"{file}: not a valid safetensors file ({e})") from None


def _meta_layout(path: Path) -> tuple:
    params = _read_json(path / "params.json")
    files = sorted(path.glob("consolidated.*.pth"))
    if not files:
        raise CheckpointError(f"{path}: params.json but no consolidated.NN.pth shard")
    embedding = _load_file(files[0]).get("tok_embeddings.weight")
    if embedding is None:
        raise CheckpointError(f"{files[0]}: no tok_embeddings.weight")
    try:
        if params.get("vocab_size", -1) <= 0:  # Meta's params.json says -1: the tokenizer decides
            params["vocab_size"] = embedding.shape[0]
        args = ModelArgs(**{k: v for k, v in params.items() if k in {f.name for f in fields(ModelArgs)}})
        n = args.dim // embedding.shape[1]  # how many ways the release was split
        with torch.device("meta"):  # sizes no model has (0 heads, a string) fail here, naming params.json
            model = Transformer(args)
    except (AttributeError, TypeError, ValueError, ZeroDivisionError, RuntimeError) as e:
        raise CheckpointError(f"{path / 'params.json'}: not LLaMA's parameters ({e})") from None
    files = [path / f"consolidated.{i:02d}.pth" for i in range(n)]
    for file in files:
        if not file.exists():
            raise CheckpointError(f"{file}: missing shard (the weights are split {n} ways)")
    return model, files


def _hf_layout(path: Path) -> tuple:
    config = _read_json(path / "config.json")
    try:  # RoPE's base: at the top level or in rope_parameters (transformers 5); plain RoPE only
        rope_parameters, scaling = config.get("rope_parameters") or {}, config.get("rope_scaling") or {}
        rope_theta = rope_parameters.get("rope_theta", 10000.0)
        for kind in (rope_parameters.get("rope_type"), scaling.get("rope_type"), scaling.get("type")):
            if kind not in (None, "default"):
                raise ValueError(f"RoPE scaling {kind!r} is not implemented")
        dim, hidden = config["hidden_size"], config["intermediate_size"]
        args = ModelArgs(
            dim=dim, n_layers=config["num_hidden_layers"], n_heads=config["num_attention_heads"],
            n_kv_heads=config.get("num_key_value_heads"), vocab_size=config["vocab_size"],
            # HF stores the SwiGLU width itself; these two reproduce it through Meta's rounding rule
            multiple_of=hidden, ffn_dim_multiplier=hidden / int(2 * 4 * dim / 3),
            norm_eps=config.get("rms_norm_eps", 1e-6), rope_theta=config.get("rope_theta", rope_theta),
            max_seq_len=config.get("max_position_embeddings", 2048))
        with torch.device("meta"):
            model = Transformer(args)
    except KeyError as e:
        raise CheckpointError(f"{path / 'config.json'}: no {e.args[0]!r}, expected a LLaMA config") from None
    except (TypeError, ValueError, ZeroDivisionError, RuntimeError) as e:
        raise CheckpointError(f"{path / 'config.json'}: not a LLaMA config ({e})") from None
    for index in (path / "model.safetensors.index.json", path / "pytorch_model.bin.index.json"):
        if index.exists():
            try:
                files = sorted({path / f for f in _read_json(index)["weight_map"].values()})
            except (KeyError, TypeError, AttributeError):
                raise CheckpointError(f'{index}: expected a "weight_map" of weight names to files') from None
            for file in files:
                if not file.exists():
                    raise CheckpointError(f"{file}: missing shard listed in {index}")
            return model, files
    files = sorted(path.glob("model*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(f"{path}: config.json but no model*.safetensors or pytorch_model*.bin")
    return model, files


def _hf_name(name: str, to_hf: bool = False) -> str:
    """Hugging Face's name for a weight -> Meta's, or back with to_hf
    (model.layers.3.self_attn.q_proj.weight <-> layers.3.attention.wq.weight)."""
    name = f".{name}"  # whole module names only, between dots: norm is not the end of attention_norm
    for hf, meta in HF_NAMES.items():
        old, new = (meta, hf) if to_hf else (hf, meta)
        name = name.replace(f".{old}.", f".{new}.")
    return name[1:]


def hf_rotary_order(w, head_dim: int, to_hf: bool):
    """Meta's q/k rows rotate pairs (2i, 2i+1) of each head, Hugging Face's rotate halves (i, i + head_dim/2):
    reorder the rows of every head from one order to the other."""
    halves = (head_dim // 2, 2) if to_hf else (2, head_dim // 2)
    return w.reshape(-1, *halves, w.shape[-1]).transpose(1, 2).reshape(w.shape)


# -----------------------------------------------------------------------------
# Saving in Hugging Face's layout, the inverse of loading: train.py writes the weights, hf_files the rest

def hf_files(args: ModelArgs, tok: "Tokenizer") -> dict:
    """config.json, generation_config.json and the tokenizer's files (as JSON objects) of a LIMA model. EOT is
    an added special token and the end-of-sequence token, so transformers, vLLM and llama.cpp stop where
    sample.py does; tokenizer.json spares transformers a protobuf-based conversion of tokenizer.model."""
    sp, bos, eot, unk = tok.sp, tok.sp.id_to_piece(tok.bos_id), "<EOT>", tok.sp.id_to_piece(tok.sp.unk_id())
    specials = {i: sp.id_to_piece(i) for i in range(tok.eot_id) if sp.is_control(i) or sp.is_unknown(i)}
    added = [dict(id=i, content=text, single_word=False, lstrip=False, rstrip=False, normalized=False,
                  special=True) for i, text in {**specials, tok.eot_id: eot}.items()]
    vocab = {sp.id_to_piece(i): i for i in range(tok.eot_id)}
    # BPE merges: every split of a piece into two pieces, ranked as SentencePiece merges, by the piece's score
    merges = sorted((-sp.get_score(i), i, k, p[:k], p[k:]) for p, i in vocab.items() for k in range(1, len(p))
                    if p[:k] in vocab and p[k:] in vocab)
    space = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
    bos_first = [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]
    tokenizer = {
        "added_tokens": added,
        # SentencePiece's dummy prefix before every text, also after BOS and EOT, as encode_dialogue gets it
        "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"}, space]},
        "post_processor": {"type": "TemplateProcessing", "single": bos_first,
                           "pair": [*bos_first, {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {bos: {"id": bos, "ids": [tok.bos_id], "tokens": [bos]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {**space, "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
            {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "unk_token": unk, "fuse_unk": True, "byte_fallback": True, "vocab": vocab,
                  "merges": [m[3:] for m in merges]}}
    names = {"bos_token": bos, "eos_token": eot, "unk_token": unk}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", **names,
        "added_tokens_decoder": {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added},
        # LIMA §2: BOS, then every turn followed by EOT, no role tags; a prompt ends after the user's EOT
        "chat_template": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}" + eot + "{% endfor %}"}
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "tie_word_embeddings": False,
        "hidden_size": args.dim, "intermediate_size": args.hidden_dim, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads or args.n_heads,
        "vocab_size": args.vocab_size, "hidden_act": "silu", "rms_norm_eps": args.norm_eps,
        "max_position_embeddings": args.max_seq_len, "rope_theta": args.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "bos_token_id": tok.bos_id, "eos_token_id": tok.eot_id, "torch_dtype": "bfloat16"}
    generation = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eot_id, "do_sample": True,  # LIMA §2
                  "temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.2, "max_new_tokens": 2048}
    return {"config.json": config, "generation_config.json": generation, "tokenizer.json": tokenizer,
            "tokenizer_config.json": tokenizer_config, "special_tokens_map.json": names,
            "added_tokens.json": {eot: tok.eot_id}}


# -----------------------------------------------------------------------------
# Tokenizer

class Tokenizer:
    """LLaMA's SentencePiece model plus LIMA's end-of-turn token EOT, a new id after the base vocabulary.
    EOT ends every utterance; no role tags: turns alternate, user first (LIMA §2)."""

    def __init__(self, path):
        import sentencepiece as spm
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: tokenizer model not found")
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.bos_id, self.eos_id, self.eot_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.vocab_size()
        self.n_words = self.eot_id + 1

    def encode(self, text: str) -> list:
        return self.sp.encode(text)

    def encode_dialogue(self, turns: list) -> tuple:
        """BOS, then each turn followed by EOT. mask is true on the assistant's tokens and their EOT: the
        tokens the loss trains on."""
        ids, mask = [self.bos_id], [False]
        for i, turn in enumerate(turns):
            piece = self.encode(turn) + [self.eot_id]
            ids += piece
            mask += [i % 2 == 1] * len(piece)
        return ids, mask

    def decode(self, ids) -> str:
        return self.sp.decode([i for i in ids if i != self.bos_id and i < self.eot_id])


# -----------------------------------------------------------------------------
# Sampling (LIMA §2: nucleus p=0.9, temperature 0.7, repetition penalty 1.2 on previously generated tokens)

def top_p_filter(probs, top_p: float, k: int = 64):
    """Zero all but the smallest set of most likely tokens whose total probability reaches top_p. Only the k
    most likely are ranked when they reach it (nearly always at temperature 0.7): as a full sort would."""
    if top_p >= 1:  # keep all: a float32 running sum can reach 1.0 before the last tokens
        return probs

    def keep(sorted_probs, order, top_p):
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens ranked above each one
        return torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(before >= top_p, 0.0))

    top, order = probs.topk(min(k, probs.shape[-1]))
    covered = (top.cumsum(-1)[..., -1] >= top_p).all()  # the sum the full sort's running sum reaches at k
    if torch.compiler.is_compiling():  # no host sync in a graph (eager torch.cond would compile at each call)
        return torch.cond(covered, lambda top, order, probs, p: keep(top, order, p),
                          lambda top, order, probs, p: keep(*probs.sort(-1, descending=True), p),
                          (top, order, probs, torch.tensor(top_p, device=probs.device)))
    return keep(top, order, top_p) if covered else keep(*probs.sort(-1, descending=True), top_p)


def penalize(logits, seen, penalty: float):
    """Repetition penalty (Keskar et al., 2019) on the tokens seen (B, vocab, bool) in this answer: positive
    logits are divided by penalty, negative ones multiplied, so either way less likely; others unchanged."""
    if penalty == 1.0 or seen is None:
        return logits
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def sample_token(logits, seen=None, temperature=0.7, top_p=0.9, repetition_penalty=1.2, u=None):
    """Next token for each row of logits (B, vocab); temperature 0 is greedy. u (B, 1) uniform in [0, 1) picks
    from the cumulative distribution (drawn by the caller: no generator or host sync in a compiled graph)."""
    logits = penalize(logits.float(), seen, repetition_penalty)
    if temperature == 0:
        return logits.argmax(-1)
    cdf = top_p_filter(F.softmax(logits / temperature, dim=-1), top_p).cumsum(-1)
    u = torch.rand(len(logits), 1, device=logits.device) if u is None else u
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)  # never a token of probability 0


@torch.no_grad()
def generate(model, prompts: list, stop_id: int, max_new_tokens: int, temperature=0.7, top_p=0.9,
             repetition_penalty=1.2, generator=None, cache=None, start_pos: int = 0, compile: bool = False):
    """Decode a batch of prompts (lists of ids) with a KV cache; yields a (B,) tensor of next tokens per step,
    one model forward each. A row ends after stop_id, max_new_tokens or the end of the context, as it would
    alone, and yields -1 from then on; the last token yielded is not fed to the model. Given a cache
    (make_cache), one prompt continues what it holds at positions < start_pos (a chat's earlier turns); else
    one is made for this call. compile: the decode step through torch.compile."""
    device, lens = model.output.weight.device, [len(p) for p in prompts]
    B, L = len(lens), max(lens)
    context = model.args.max_seq_len if cache is None else cache["causal"].shape[0]
    limits = [min(max_new_tokens, context - start_pos - n) for n in lens]  # each row's own room
    if max(limits) < 1:
        return
    if cache is None:
        cache = model.make_cache(B, start_pos + max(L, max(n + m for n, m in zip(lens, limits))))
    last = cache["causal"].shape[0] - 1
    steps, lens, limits = max(limits), torch.tensor(lens, device=device), torch.tensor(limits, device=device)
    tokens = torch.tensor([p + [0] * (L - len(p)) for p in prompts], device=device)  # right-padded

    def step(tokens, cache, pos, seen, u):  # a token per row at positions pos (B,): fixed shapes, one graph
        logits = model(tokens[:, None], cache, pos[:, None])[:, -1]
        return sample_token(logits, seen, temperature, top_p, repetition_penalty, u)

    if compile:  # a CUDA graph on a GPU; on a CPU inductor's GEMMs, prepacked where sample.py froze weights
        for t in [*cache["k"], *cache["v"], cache["cos"], cache["sin"], cache["causal"]]:
            # the cache's positions (dim 2 of keys and values, 0 of the tables, 1 too of the mask) number as
            # each batch needs: one graph for all
            torch._dynamo.mark_dynamic(t, 2 if t.dim() == 4 else [0, 1] if t.dtype == torch.bool else 0)
            if device.type == "cuda":  # written in place, at the address the graph recorded
                torch._dynamo.mark_static_address(t)
        step = torch.compile(step, fullgraph=True, mode="reduce-overhead" if device.type == "cuda" else
                             "max-autotune")
    # a row longer than the cache has no budget (-1 only); its positions are clamped so it cannot overflow
    logits = model(tokens, cache, (start_pos + torch.arange(L, device=device)).clamp(max=last).expand(B, L))
    logits = logits[torch.arange(B, device=device), lens - 1]  # after each row's last prompt token
    seen = torch.zeros(logits.shape, dtype=torch.bool, device=device)
    done = limits < 1
    for k in range(steps):
        u = torch.rand(B, 1, generator=generator, device=device)
        if k == 0:
            nxt = sample_token(logits, seen, temperature, top_p, repetition_penalty, u)
        else:  # feed the last token (done rows feed something, at most into the cache's last slot)
            nxt = step(nxt.clamp(min=0), cache, (start_pos + lens + k - 1).clamp(max=last), seen, u)
        nxt = torch.where(done, -1, nxt)
        yield nxt
        seen.scatter_(1, nxt.clamp(min=0)[:, None], True)  # a finished row's is never read
        done |= (nxt == stop_id) | (k + 1 >= limits)
        # reading done stalls a GPU's queue, so there only every 16 steps; on a CPU it costs nothing
        if (device.type == "cpu" or k % 16 == 15) and done.all():
            break
