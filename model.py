"""
The LLaMA model (Touvron et al., 2023) as LIMA fine-tunes it, its tokenizer with LIMA's end-of-turn
token, and LIMA's sampler. Parameter names match Meta's release, so a checkpoint loads with a plain
load_state_dict. Reading and writing checkpoint files is checkpoint.py's job: this file knows no
file format.
"""
import math
from dataclasses import dataclass
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
            "65B": dict(dim=8192, n_layers=80, n_heads=64),
        }
        sizes["30B"] = sizes["33B"]  # Meta's release calls 33B "30B"
        if name not in sizes:
            raise ValueError(f"unknown size {name!r}, expected one of {', '.join(sizes)}")
        return cls(**{**sizes[name], **overrides})

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

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
        x32 = x.float()  # in float32: bf16 sums of squares lose too much precision
        mean_square = x32.pow(2).mean(-1, keepdim=True)
        normed = x32 * torch.rsqrt(mean_square + self.eps)  # x / RMS(x)
        return normed.type_as(x) * self.weight  # a learned gain per channel, no bias


def rope(head_dim: int, positions, theta: float) -> tuple:
    """cos and sin of the angles pos * theta^(-2i/head_dim), in float32, each of shape
    (*positions.shape, head_dim/2)."""
    i = torch.arange(0, head_dim, 2, device=positions.device).float()
    # one frequency a pair of channels, from 1 down to nearly 1/theta: fast turns for the first
    # pairs (nearby tokens), slow ones for the last (distant tokens)
    freqs = 1.0 / theta ** (i / head_dim)
    angles = positions.float()[..., None] * freqs
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each pair (x[2i], x[2i+1]) of every head by its angle; x: (B, heads, T, head_dim)."""
    # Meta's pairs are neighbours (2i, 2i+1): HF's checkpoints pair i with i + head_dim/2, and
    # checkpoint.py reorders their q and k rows on the way in and out
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    # the 2-D rotation [[cos, -sin], [sin, cos]] of each pair (Su et al., 2021): a query and a key
    # rotated by their positions meet at an angle that depends only on how far apart they are
    rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads or args.n_heads
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, mask=None, cache=None):
        B, T, _ = x.shape
        # project, then split the channels into heads: (B, heads, T, head_dim)
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        # position enters by rotation, of queries and keys only (not values)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if cache is not None:  # decoding: row r's keys and values go to its positions pos[r]
            cache_k, cache_v, rows, pos = cache
            cache_k[rows, :, pos] = k.transpose(1, 2)
            cache_v[rows, :, pos] = v.transpose(1, 2)
            k, v = cache_k, cache_v  # attend over the whole cache: the mask hides what is ahead
        # grouped-query: each key/value head serves n_heads/n_kv_heads queries
        gqa = self.n_kv_heads < self.n_heads
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
        out = out.transpose(1, 2).reshape(B, T, -1)  # the heads side by side again: (B, T, dim)
        return self.wo(out)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)

    def forward(self, x):
        # SwiGLU (Shazeer, 2020): w1's SiLU gates w3's features, w2 projects back to dim
        gate = F.silu(self.w1(x))
        return self.w2(gate * self.w3(x))


class Block(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        # LIMA §3: residual dropout rises linearly from 0.0 at the bottom layer to args.dropout
        self.dropout = args.dropout * layer_id / max(1, args.n_layers - 1)

    def forward(self, x, cos, sin, mask=None, cache=None):
        # pre-norm residual blocks: each sublayer reads a normalized copy and adds to x
        attended = self.attention(self.attention_norm(x), cos, sin, mask, cache)
        h = x + F.dropout(attended, self.dropout, self.training)
        fed = self.feed_forward(self.ffn_norm(h))
        return h + F.dropout(fed, self.dropout, self.training)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        # the embedding's weight is set below: nn.Embedding's own init on the meta device is slow
        weight = torch.empty(args.vocab_size, args.dim)
        self.tok_embeddings = nn.Embedding.from_pretrained(weight, freeze=False)
        self.layers = nn.ModuleList(Block(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        for module in self.modules():  # only matters for a model trained from scratch (tiny)
            if isinstance(module, (nn.Linear, nn.Embedding)) and not module.weight.is_meta:
                nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, tokens, cache=None, pos=None):
        """tokens (B, T) -> logits (B, T, vocab), each token attending to those before it. Decoding:
        their keys and values are written into cache (make_cache) at their positions pos (B, T)."""
        h = self.tok_embeddings(tokens)
        if cache is None:  # training: the whole sequence, causal attention
            positions = torch.arange(tokens.shape[1], device=tokens.device)
            cos, sin = rope(self.args.head_dim, positions, self.args.rope_theta)
            for layer in self.layers:
                h = layer(h, cos, sin)
            return self.output(self.norm(h))
        # decoding: each row's tokens at its own positions, read from the tables made once per
        # cache; the None is the heads' dimension, for broadcasting
        cos = cache["cos"][pos][:, None]  # (B, 1, T, head_dim/2)
        sin = cache["sin"][pos][:, None]
        mask = cache["causal"][pos][:, None]  # (B, 1, T, cache length): what each token sees
        rows = torch.arange(tokens.shape[0], device=tokens.device)[:, None]  # (B, 1)
        for i, layer in enumerate(self.layers):
            layer_cache = (cache["k"][i], cache["v"][i], rows, pos)
            h = layer(h, cos, sin, mask, layer_cache)
        return self.output(self.norm(h))

    def make_cache(self, batch_size: int, max_len: int, dtype=None) -> dict:
        """Each layer's keys and values for decoding up to max_len positions (prompt included), and
        the RoPE angles (float32, whatever the model's dtype) and causal mask of those positions. A
        plain argument of forward, not the model's state: a compiled step reads whichever cache
        it is given."""
        device = self.output.weight.device
        dtype = dtype or self.output.weight.dtype
        n_kv_heads = self.args.n_kv_heads or self.args.n_heads
        shape = (batch_size, n_kv_heads, max_len, self.args.head_dim)
        keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]
        values = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]
        positions = torch.arange(max_len, device=device)
        cos, sin = rope(self.args.head_dim, positions, self.args.rope_theta)
        # causal[i, j]: position i sees position j; a row's unwritten positions ahead of it
        # hold zeros, hidden by this mask
        causal = positions[None, :] <= positions[:, None]
        return dict(k=keys, v=values, cos=cos, sin=sin, causal=causal)

    @torch.no_grad()
    def grow_vocab(self, vocab_size: int):
        """Rows for new tokens (LIMA's EOT), each the mean of the old rows: an 'average' token."""
        n_new = vocab_size - self.args.vocab_size
        for module in (self.tok_embeddings, self.output):
            w = module.weight
            mean = w.mean(0, keepdim=True, dtype=torch.float32).to(w.dtype)
            grown = torch.cat([w, mean.expand(n_new, -1)])
            module.weight = nn.Parameter(grown, requires_grad=w.requires_grad)
        self.tok_embeddings.num_embeddings = vocab_size
        self.output.out_features = vocab_size
        self.args.vocab_size = vocab_size


# -----------------------------------------------------------------------------
# Tokenizer

class Tokenizer:
    """LLaMA's SentencePiece model plus LIMA's end-of-turn token EOT, a new id after the base
    vocabulary. EOT ends every utterance; no role tags: turns alternate, user first (LIMA §2)."""

    def __init__(self, path):
        import sentencepiece as spm
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: tokenizer model not found")
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.eot_id = self.sp.vocab_size()  # the id after the base vocabulary
        self.n_words = self.eot_id + 1

    def encode(self, text: str) -> list:
        return self.sp.encode(text)

    def encode_dialogue(self, turns: list) -> tuple:
        """BOS, then each turn followed by EOT. mask is true on the assistant's tokens and their
        EOT: the tokens the loss trains on."""
        ids, mask = [self.bos_id], [False]
        for i, turn in enumerate(turns):
            piece = self.encode(turn) + [self.eot_id]
            ids += piece
            mask += [i % 2 == 1] * len(piece)  # turns alternate, user first
        return ids, mask

    def decode(self, ids) -> str:
        text_ids = [i for i in ids if i != self.bos_id and i < self.eot_id]  # BOS and EOT unsaid
        return self.sp.decode(text_ids)


# -----------------------------------------------------------------------------
# Sampling (LIMA §2: nucleus p=0.9, temperature 0.7, repetition penalty 1.2 on generated tokens)

FIXED = 2.0**60  # a probability as a whole number of 2^-60: sums of them are exact, in any order
BITS = {torch.float32: torch.int32, torch.float64: torch.int64}  # an integer of each float's size


def top_p_filter(probs, top_p: float):
    """Zero all but the smallest set of most likely tokens whose total probability reaches top_p in
    each row of probs (B, vocab): the tokens a sort of the vocabulary keeps, each with less than
    top_p above it (and of tokens tied at the edge, as many as that allows). Found without sorting
    and without a branch on the data, so that a decode step never waits for the host and a CUDA
    graph can hold it: the edge (the least likely token kept) is found a few bits at a time from
    the top, a radix select."""
    if top_p >= 1:  # keep all: a float32 running sum can reach 1.0 before the last tokens
        return probs
    bits = probs.view(BITS[probs.dtype])  # a float >= 0 orders as its bits do, read as an integer
    mass = (probs * FIXED).long()  # exact for a float32 probability above 2^-37
    fraction, exponent = math.frexp(top_p)  # the float32 nearest top_p: 24 bits, to nearest even
    top_p32 = math.ldexp(round(fraction * 2**24), exponent - 24)
    room = mass.sum(-1, keepdim=True) - math.ceil(top_p32 * FIXED)  # the most mass below the edge
    # buckets no more than twice the vocabulary's size, at most 2^15: for LLaMA's 32,000 tokens
    # two levels of float32's 30 bits (the top 2 are 0 below 2.0)
    width = max(1, min(15, (probs.shape[-1] - 1).bit_length()))
    hist = torch.empty(len(probs), 2**width + 2, dtype=torch.long, device=probs.device)
    edge = 0  # the edge's bits found so far, the lower ones 0
    for level in reversed(range(math.ceil((8 * probs.element_size() - 2) / width))):
        shift = level * width
        # bucket 0: the tokens below the range searched; then one per value of its next bits; above
        start = edge - 2**shift  # bucket j holds bits from start + j * 2**shift
        bucket = (bits - start).bitwise_right_shift_(shift).clamp_(0, 2**width + 1)
        at_or_below = hist.zero_().scatter_add_(-1, bucket.long(), mass).cumsum_(-1)
        # the edge's bucket is the first whose running sum passes room (bucket 0's never does,
        # unless all is kept)
        b = torch.searchsorted(at_or_below, room, right=True).clamp_(min=1)
        edge = start + b * 2**shift
    edge = edge.to(bits.dtype)
    # every token above the edge is kept, and of those tied at it as many as stay below the limit:
    # the fewest that leave out (with the tokens below the edge) no more than room
    mass_at_edge = (edge.view(probs.dtype) * FIXED).long().clamp_(min=1)
    # a division rounding up; at most the vocabulary, to fit the ties' count below
    n_tied = (-((room - at_or_below.gather(-1, b)) // mass_at_edge)).clamp_(max=probs.shape[-1])
    # comparisons written into integers and floats, not bools, which a CPU vectorizes (2-5x
    # faster), and the ties counted in their own dtype (counting in int64 costs up to 9x more)
    over = bits - edge  # > 0 above the edge, 0 at it
    ties = torch.eq(over, 0, out=torch.empty_like(over)).cumsum(-1, dtype=over.dtype)
    past = (ties - n_tied.to(ties.dtype)).clamp_(0, 1)  # 1 from the first tie left out on
    return torch.ge(over, past, out=torch.empty_like(probs)).mul_(probs)


def penalize(logits, seen, penalty: float):
    """Repetition penalty (Keskar et al., 2019) on the tokens seen (B, vocab: 1 where seen, else 0)
    in this answer: positive logits are divided by penalty, negative ones multiplied: either way
    less likely."""
    if penalty == 1.0 or seen is None:
        return logits
    # in float arithmetic, not torch.where on bools (0.96 against 0.72 ms at batch 8 in generate's
    # loop, on a CPU): each logit is multiplied by times and divided by over, one penalty, one 1
    seen = seen.to(logits.dtype)
    negative = torch.lt(logits, 0, out=torch.empty_like(logits)).mul_(seen)  # seen, negative
    positive = seen - negative  # seen and positive (or 0, which either way stays 0)
    times = (1 - negative).add_(negative, alpha=penalty)  # 1 + (penalty - 1) would round
    over = (1 - positive).add_(positive, alpha=penalty)
    return logits * times / over


def sample_token(logits, seen=None, temperature=0.7, top_p=0.9, repetition_penalty=1.2, u=None):
    """Next token for each row of logits (B, vocab); temperature 0 is greedy. u (B, 1), uniform in
    [0, 1), picks from the cumulative distribution (drawn by the caller: no generator in a
    compiled graph)."""
    logits = penalize(logits.float(), seen, repetition_penalty)
    if temperature == 0:
        return logits.argmax(-1)
    # below 1, temperature sharpens the distribution: the likely tokens gain, the tail loses
    probs = F.softmax(logits / temperature, dim=-1)
    kept = top_p_filter(probs, top_p)
    cdf = kept.cumsum(-1)  # not renormalized: u is scaled to the kept total instead
    if u is None:
        u = torch.rand(len(logits), 1, device=logits.device)
    # the first token whose running sum passes u's share of the total; right=True: never a token
    # of probability 0
    picked = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    return picked.squeeze(-1)


def compile_step(step, cache, device):
    """The decode step through torch.compile: on CUDA a CUDA graph (mode="reduce-overhead"; the
    sampler has no branch on the data, for which inductor would skip it: test_sample.py checks on
    a GPU), on a CPU inductor's GEMMs (prepacked where sample.py froze the weights). The cache's
    positions are dynamic: one graph serves every cache length."""
    for t in [*cache["k"], *cache["v"]]:
        torch._dynamo.mark_dynamic(t, 2)  # (B, heads, positions, head_dim)
    for t in (cache["cos"], cache["sin"]):
        torch._dynamo.mark_dynamic(t, 0)  # (positions, head_dim/2)
    torch._dynamo.mark_dynamic(cache["causal"], [0, 1])  # (positions, positions)
    if device.type == "cuda":  # written in place, at the addresses the graph recorded
        tables = [cache["cos"], cache["sin"], cache["causal"]]
        for t in [*cache["k"], *cache["v"], *tables]:
            torch._dynamo.mark_static_address(t)
        return torch.compile(step, fullgraph=True, mode="reduce-overhead")
    return torch.compile(step, fullgraph=True, mode="max-autotune")


@torch.no_grad()
def generate(model, prompts: list, stop_id: int, max_new_tokens: int, temperature=0.7, top_p=0.9,
             repetition_penalty=1.2, generator=None, cache=None, start_pos: int = 0,
             compile: bool = False):
    """Decode a batch of prompts (lists of ids) with a KV cache; yields a (B,) tensor of next tokens
    per step, one model forward each. A row ends after stop_id, max_new_tokens or the end of the
    context, as it would alone, and yields -1 from then on; the last token yielded is not fed to the
    model. Given a cache (make_cache), one prompt continues what it holds at positions < start_pos
    (a chat's earlier turns); else one is made for this call. generator: one torch.Generator, or a
    list of one a row, whose answer then depends on its prompt and generator alone, not on its
    batch. compile: the decode step through torch.compile (compile_step)."""
    device = model.output.weight.device
    lens = [len(p) for p in prompts]
    B, L = len(lens), max(lens)
    context = model.args.max_seq_len if cache is None else cache["causal"].shape[0]
    limits = [min(max_new_tokens, context - start_pos - n) for n in lens]  # each row's own room
    if max(limits) < 1:
        return
    if cache is None:
        longest = max(n + limit for n, limit in zip(lens, limits))
        cache = model.make_cache(B, start_pos + max(L, longest))
    last = cache["causal"].shape[0] - 1
    steps = max(limits)
    lens = torch.tensor(lens, device=device)
    limits = torch.tensor(limits, device=device)
    padded = [p + [0] * (L - len(p)) for p in prompts]  # right-padded to the longest
    tokens = torch.tensor(padded, device=device)

    # one token a row at positions pos: the same shapes every step, so one compiled graph
    def step(tokens, cache, pos, seen, u):
        logits = model(tokens[:, None], cache, pos[:, None])[:, -1]
        return sample_token(logits, seen, temperature, top_p, repetition_penalty, u)

    if compile:
        step = compile_step(step, cache, device)
    # the prompts in one forward ("prefill"). A row longer than the cache has no budget (-1
    # only); its positions are clamped to fit
    prompt_pos = start_pos + torch.arange(L, device=device)
    prompt_pos = prompt_pos.clamp(max=last).expand(B, L)
    logits = model(tokens, cache, prompt_pos)
    rows = torch.arange(B, device=device)
    logits = logits[rows, lens - 1]  # after each row's last prompt token, not its padding
    seen = torch.zeros(logits.shape, device=device)  # 1.0 where generated: see penalize
    done = limits < 1
    for k in range(steps):
        if isinstance(generator, list):  # each row draws from its own
            draws = [torch.rand(1, 1, generator=g, device=device) for g in generator]
            u = torch.cat(draws)
        else:
            u = torch.rand(B, 1, generator=generator, device=device)
        if k == 0:
            nxt = sample_token(logits, seen, temperature, top_p, repetition_penalty, u)
        else:  # feed the last token (done rows feed something, at most into the last slot)
            pos = (start_pos + lens + k - 1).clamp(max=last)
            nxt = step(nxt.clamp(min=0), cache, pos, seen, u)
        nxt = torch.where(done, -1, nxt)
        yield nxt
        # LIMA penalizes what was generated, not the prompt: seen starts empty
        seen.scatter_(1, nxt.clamp(min=0)[:, None], 1.0)  # a finished row's is never read
        done |= (nxt == stop_id) | (k + 1 >= limits)
        # reading done stalls a GPU's queue (the loop's only read: the sampler reads nothing back),
        # so there only every 16 steps; on a CPU it costs nothing
        if (device.type == "cpu" or k % 16 == 15) and done.all():
            break
