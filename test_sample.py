"""LIMA's sampler (model.py) and sample.py's command line: single prompt, chat, and a file of prompts."""
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from checkpoint import load_model
from model import ModelArgs, Tokenizer, Transformer, generate, penalize, sample_token, top_p_filter

ROOT = Path(__file__).parent
NEVER = -1  # a stop id no model produces


def tiny_model(vocab=48, max_seq_len=128, seed=0):
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=vocab, multiple_of=32,
                                  max_seq_len=max_seq_len))
    with torch.no_grad():  # larger than the training init, for peaked distributions with clear winners
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    return model.eval()


def seen(logits, generated):
    """The penalty's mask (B, vocab) of the tokens in each row of generated."""
    mask = torch.zeros(logits.shape, dtype=torch.bool)
    for row, ids in zip(mask, generated):
        row[ids] = True
    return mask


def greedy_reference(model, ids, n, penalty=1.0, stop_id=NEVER):
    """Greedy answer by a full forward pass over the whole sequence at every step, no cache."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq]))[:, -1]
            seq.append(penalize(logits, seen(logits, [seq[len(ids):]]), penalty).argmax(-1).item())
            if seq[-1] == stop_id:
                break
    return seq[len(ids):]


def run_generate(model, prompts, n, stop_id=NEVER, **kw):
    """generate's per-row answers: a row that has ended yields -1."""
    rows = [[] for _ in prompts]
    for nxt in generate(model, prompts, stop_id, n, **kw):
        for row, t in zip(rows, nxt.tolist()):
            row.append(t)
    answers = [[t for t in row if t >= 0] for row in rows]
    assert all(row == a + [-1] * (len(row) - len(a)) for row, a in zip(rows, answers))  # -1 to the end
    return answers


# -----------------------------------------------------------------------------
# The sampler


@pytest.mark.parametrize("penalty", [1.0, 1.2])
def test_greedy_cached_decoding_equals_full_forward(penalty):
    model = tiny_model()
    prompt = [1, 5, 9, 3, 7, 7, 2]
    got = run_generate(model, [prompt], 40, temperature=0, repetition_penalty=penalty)[0]
    assert got == greedy_reference(model, prompt, 40, penalty)
    assert len(got) == 40 and len(set(got)) > 3  # a real sequence, not one token repeated


def test_generate_continues_a_cached_dialogue():
    """Chat: the second turn is fed at start_pos on top of the cached first one, as if decoded from scratch."""
    model = tiny_model()
    cache = model.make_cache(1, 64)
    first = [1, 5, 9, 3, 47]
    a1 = run_generate(model, [first], 6, temperature=0, cache=cache)[0]
    dialogue = first + a1 + [47, 4, 8, 11, 47]
    cached = len(first) + len(a1) - 1  # the last token yielded is not fed
    a2 = run_generate(model, [dialogue[cached:]], 8, temperature=0, cache=cache, start_pos=cached)[0]
    assert len(run_generate(model, [[1, 2]], 100, temperature=0, cache=cache, start_pos=60)[0]) == 2  # ends at 64
    assert a1 == greedy_reference(model, first, 6, 1.2)
    assert a2 == greedy_reference(model, dialogue, 8, 1.2)


def test_never_past_the_context():
    model = tiny_model(max_seq_len=32)
    assert len(run_generate(model, [list(range(1, 30))], 100, temperature=0)[0]) == 3
    assert run_generate(model, [list(range(32))], 100, temperature=0) == [[]]


def kept(probs, p):
    return top_p_filter(torch.tensor([probs]), p)[0].nonzero().flatten().tolist()


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = [0.0625, 0.5, 0.0, 0.25, 0.125, 0.0625]  # exact in binary, so sums are exact
    assert kept(probs, 0.5) == [1]
    assert kept(probs, 0.75) == [1, 3]  # reaching p exactly is enough
    assert kept(probs, 0.76) == [1, 3, 4]
    assert kept(probs, 0.875) == [1, 3, 4] and len(kept(probs, 0.88)) == 4
    assert kept(probs, 1.0) == [0, 1, 3, 4, 5]  # p = 1: every token with nonzero probability
    assert kept(probs, 1e-9) == [1]  # tiny p: the most likely token alone
    out = top_p_filter(torch.tensor([probs]), 0.76)[0]
    assert out.tolist() == [0.0, 0.5, 0.0, 0.25, 0.125, 0.0]  # kept probabilities are unchanged
    ties = [0.125, 0.5, 0.125, 0.125, 0.125]  # the second place is a four-way tie: exactly one is kept
    assert len(kept(ties, 0.6)) == 2 and 1 in kept(ties, 0.6) and len(kept(ties, 0.75)) == 3
    assert len(kept([0.25, 0.25, 0.5], 0.6)) == 2 and len(kept([0.25] * 4, 0.5)) == 2


def test_top_p_on_random_distributions():
    torch.manual_seed(0)
    probs = torch.softmax(3 * torch.randn(64, 500, dtype=torch.float64), -1)
    for p in [0.1, 0.5, 0.9, 0.99]:
        out = top_p_filter(probs, p)
        sorted_probs = probs.sort(-1, descending=True).values
        want = (sorted_probs.cumsum(-1) < p).sum(-1) + 1  # the smallest k whose top-k mass reaches p
        assert ((out > 0).sum(-1) == want).all()
        assert (out.where(out > 0, 2).min(-1).values >= probs.where(out == 0, 0).max(-1).values).all()  # the top k
    softmax32 = torch.softmax(torch.randn(4, 32001) * 2, -1)
    assert top_p_filter(softmax32, 1.0).equal(softmax32)  # float32 sums reach 1.0 early; p = 1 still keeps all


def test_repetition_penalty_sign_rule():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 0.0, 1.5], [2.0, -1.0, 0.5, -3.0, 0.0, 1.5]])
    generated = seen(logits, [[0, 1, 1], [3, 4, 4]])  # a repeated token is penalised once
    want = logits.clone()
    want[0, 0], want[0, 1], want[1, 3] = 2.0 / 2, -1.0 * 2, -3.0 * 2  # divide positive, multiply negative
    assert torch.equal(penalize(logits, generated, 2.0), want)  # every other logit (and the 0.0 one) untouched
    want[0, 0], want[0, 1], want[1, 3] = 2.0 / 1.2, -1.0 * 1.2, -3.0 * 1.2
    assert torch.allclose(penalize(logits, generated, 1.2), want, rtol=1e-6, atol=0)
    assert torch.equal(penalize(logits, generated, 1.0), logits)
    # bit for bit the rule as transformers writes it (a float32 divide or multiply by the penalty),
    # for penalties where 1 + (penalty - 1) rounds to another float32; 0 and -0 keep their sign
    wide = torch.randn(3, 5000) * 10
    wide[:, :4] = torch.tensor([0.0, -0.0, 1e-30, -1e30])
    mask = torch.rand(3, 5000) < 0.5
    for penalty in (1.2, 1.8958727617381361, 0.7068525117844406, 4.029065448806512):
        rule = torch.where(wide > 0, wide / penalty, wide * penalty)
        want = torch.where(mask, rule, wide)
        for mask_as in (mask, mask.float()):
            got = penalize(wide, mask_as, penalty)
            assert torch.equal(got, want) and torch.equal(got.signbit(), want.signbit())
    # through the sampler: penalising the winner hands the argmax to the runner-up, whatever the sign
    first = torch.tensor([[True, False, False]])
    assert sample_token(torch.tensor([[3.0, 2.6, 0.0]]), first, temperature=0).item() == 1
    assert sample_token(torch.tensor([[-1.0, -1.1, -5.0]]), first, temperature=0).item() == 1
    assert sample_token(torch.tensor([[-1.0, -1.1, -5.0]]), None, temperature=0).item() == 0


def test_fixed_seed_is_reproducible():
    model = tiny_model()

    def sample(seed):
        return run_generate(model, [[1, 5, 9], [1, 2]], 30, generator=torch.Generator().manual_seed(seed))

    assert sample(3) == sample(3)
    assert sample(3) != sample(4)


def test_batched_greedy_equals_one_at_a_time():
    model = tiny_model()
    prompts = [[1, 5], [1, 9, 3, 7, 2, 11, 4, 30, 31], [1, 6, 6, 8, 10]]  # right padding of 7 and 4
    free = [run_generate(model, [p], 20, temperature=0)[0] for p in prompts]
    stop = free[1][6]  # rows now stop at different steps, some not at all
    single = [run_generate(model, [p], 20, stop_id=stop, temperature=0)[0] for p in prompts]
    assert len({len(a) for a in single}) > 1 and any(a[-1] != stop for a in single)
    assert run_generate(model, prompts, 20, stop_id=stop, temperature=0) == single


def test_each_prompt_has_its_own_budget():
    """A prompt near the end of the context gets the few tokens it has room for; the others in its batch
    still get max_new_tokens, as they would alone."""
    model = tiny_model(max_seq_len=32)
    prompts = [[1, 5], list(range(1, 30)), [1, 6, 6, 8, 10]]  # the second has room for 3 tokens
    single = [run_generate(model, [p], 10, temperature=0)[0] for p in prompts]
    assert [len(a) for a in single] == [10, 3, 10]
    assert run_generate(model, prompts, 10, temperature=0) == single
    no_room = list(range(32))
    assert run_generate(model, [prompts[0], no_room], 10, temperature=0) == [single[0], []]
    cache = model.make_cache(2, 16)  # a cache shorter than one prompt of the batch (train.py's dev answers)
    assert run_generate(model, [list(range(1, 21)), prompts[0]], 10, temperature=0, cache=cache) == [[], single[0]]


def full_sort_top_p(probs, top_p):
    """The nucleus by sorting the whole vocabulary."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    sorted_probs[sorted_probs.cumsum(-1) - sorted_probs >= top_p] = 0.0
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)


def test_top_p_equals_the_full_sort_peaked_or_flat():
    """The radix select keeps exactly the full sort's nucleus, whether the 64 most likely tokens
    hold top_p (peaked distributions, nearly always at temperature 0.7) or not (flat ones)."""
    torch.manual_seed(0)
    fallbacks = 0
    for scale in [0.5, 2, 4, 8, 16]:  # from nearly flat to peaked
        probs = torch.softmax(scale * torch.randn(8, 32001), -1)
        for p in [0.1, 0.5, 0.9, 0.99]:
            fallbacks += (probs.topk(64).values.sum(-1) < p).any().item()
            assert torch.equal(top_p_filter(probs, p), full_sort_top_p(probs, p)), (scale, p)
    assert 0 < fallbacks < 20  # both kinds of distribution were met


def test_top_p_sums_exactly():
    """The nucleus of float32 probabilities as exact arithmetic has it (a float64 running sum over
    the sorted vocabulary, against top_p as float32), where a float32 running sum may round across
    top_p. Compared as sorted values: of tokens tied at the edge, the sort and the radix select may
    keep different ones."""
    torch.manual_seed(0)
    rounded = 0
    for scale in [0.5, 2, 4]:
        probs = torch.softmax(scale * torch.randn(64, 32001), -1)
        for p in [0.5, 0.9, 0.99]:
            p32 = torch.tensor(p).item()  # the float32 nearest p, as a Python float
            want = full_sort_top_p(probs.double(), p32).float()
            got = top_p_filter(probs, p)
            assert torch.equal(got.sort(-1).values, want.sort(-1).values), (scale, p)
            rounded += ((want > 0).sum(-1) != (full_sort_top_p(probs, p) > 0).sum(-1)).sum().item()
    assert 0 < rounded < 10  # rows whose float32 running sum rounds across top_p: a few


@pytest.mark.parametrize("scale", [1.0, 6.0])  # a nucleus of more than 64 tokens, and of fewer
def test_sampled_tokens_follow_the_filtered_distribution(scale):
    torch.manual_seed(0)
    logits = scale * torch.randn(1, 300)
    seen = torch.zeros(1, 300, dtype=torch.bool)
    seen[0, logits[0].topk(3).indices[1:]] = True  # the penalty demotes the second and third most likely
    want = full_sort_top_p(torch.softmax(penalize(logits, seen, 1.2) / 0.7, -1), 0.9)[0]
    assert ((want > 0).sum() > 64) == (scale == 1.0)
    n = 40000
    u = torch.rand(n, 1, generator=torch.Generator().manual_seed(1))
    tokens = sample_token(logits.expand(n, -1), seen.expand(n, -1), 0.7, 0.9, 1.2, u)
    freq = torch.bincount(tokens, minlength=300) / n
    want = want / want.sum()
    assert (freq[want == 0] == 0).all()  # never a token outside the nucleus
    assert ((freq - want).abs() <= 4 * (want * (1 - want) / n).sqrt() + 1e-4).all()  # 4 standard errors


def test_compiled_decode_step_is_one_graph_and_decodes_the_same(monkeypatch):
    """generate(compile=True) traces the decode step whole (fullgraph) and yields the same tokens as
    eager, greedy and sampled (with this model, LIMA's sampling keeps a few tokens; at temperature
    1.5 and top_p 0.98 most of them). The graph runs on dynamo's eager backend: a fast test."""
    model = tiny_model(vocab=100)
    prompts = [[1, 5, 9], [1, 2, 3, 4, 5, 6, 7]]
    settings = [dict(temperature=0), dict(temperature=0.7, top_p=0.9), dict(temperature=1.5, top_p=0.98)]
    eager = [run_generate(model, prompts, 10, **kw, generator=torch.Generator().manual_seed(0))
             for kw in settings]
    compiled = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled(fn, **{**kw, "backend": "eager"}))
    got = [run_generate(model, prompts, 10, **kw, generator=torch.Generator().manual_seed(0), compile=True)
           for kw in settings]
    assert got == eager and len({str(a) for a in got}) == 3


def test_compiled_with_frozen_weights_reads_each_calls_own_cache(monkeypatch):
    """sample.py --compile on a CPU: inductor, weights frozen into the graph. Each call's cache is an input
    of the compiled step, not baked into it: a second batch of the same shapes with other prompts, and a third
    with a shorter cache, reuse the graph and decode as eager does."""
    import torch._inductor.config
    monkeypatch.setattr(torch._inductor.config, "freezing", True)
    compiled = torch.compile  # inductor without "max-autotune", whose GEMM choice takes the time here
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled(fn, **{**kw, "mode": None}))
    torch._dynamo.reset()
    model = tiny_model(vocab=100)
    batches = [[[1, 5, 9], [1, 2, 3, 4, 5, 6, 7]], [[1, 8, 8], [1, 7, 6, 5, 4, 3, 2]], [[1, 4], [1, 9, 9, 9]]]
    eager = [run_generate(model, b, 6, temperature=0) for b in batches]
    assert eager[0] != eager[1]
    counters = torch._dynamo.utils.counters
    counters.clear()
    assert [run_generate(model, b, 6, temperature=0, compile=True) for b in batches] == eager
    assert counters["stats"]["unique_graphs"] == 1  # the third batch's shorter cache reuses the graph too


class InductorKeepingGraphs:
    """A torch.compile backend: inductor, keeping each FX graph that dynamo hands it."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        self.graphs.append(gm)
        return compile_fx(gm, example_inputs)


def test_compiled_lima_sampling_is_one_inductor_graph_without_cond(monkeypatch):
    """generate(compile=True) with LIMA's sampling (temperature 0.7, top_p 0.9, penalty 1.2) under
    inductor: dynamo hands it one graph, with no graph break and no control flow (a torch.cond,
    which inductor would lower to a host `if pred.item():` and for which it gives up CUDA graphs),
    and it decodes as eager does."""
    backend = InductorKeepingGraphs()
    compiled = torch.compile  # compile_step's mode (max-autotune) is inductor's: the backend's here
    monkeypatch.setattr(torch, "compile",
                        lambda fn, mode=None, **kw: compiled(fn, backend=backend, **kw))
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    model = tiny_model(vocab=100)
    prompts = [[1, 5, 9], [1, 2, 3, 4, 5, 6, 7]]
    eager = run_generate(model, prompts, 8, generator=torch.Generator().manual_seed(0))
    got = run_generate(model, prompts, 8, generator=torch.Generator().manual_seed(0), compile=True)
    assert got == eager
    assert len(backend.graphs) == 1 and counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]
    targets = [n.target for n in backend.graphs[0].graph.nodes if n.op == "call_function"]
    assert torch.searchsorted in targets  # the sampler is in the graph
    assert torch.ops.higher_order.cond not in targets
    assert not any(isinstance(t, torch._ops.HigherOrderOperator) for t in targets)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_sampling_never_syncs_and_the_compiled_step_keeps_its_cuda_graph():
    """On a GPU: LIMA's sampling queues its kernels without waiting for them (torch.cuda's sync
    debug mode raises at any host sync), and generate(compile=True), inductor with
    mode="reduce-overhead" (compile_step), keeps its CUDA graph: inductor counts no skip."""
    torch.manual_seed(0)
    logits = torch.randn(4, 32001, device="cuda")
    seen = torch.zeros(4, 32001, dtype=torch.bool, device="cuda")
    seen[:, :10] = True
    sample_token(logits, seen)  # the first calls may load kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for scale in [0.5, 8.0]:  # a nucleus of thousands of tokens, and of a few
            sample_token(scale * logits, seen)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    model = tiny_model(vocab=100).cuda()
    answers = run_generate(model, [[1, 5, 9], [1, 2, 3, 4, 5, 6, 7]], 20, compile=True,
                           generator=torch.Generator("cuda").manual_seed(0))
    assert [len(a) for a in answers] == [20, 20]
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["inductor"]["cudagraph_skips"] == 0, "a cudagraph skip: see the log's reason"


MODEL_PY = str(ROOT / "model.py")


class HostReads(TorchDispatchMode):
    """Each read of a tensor's value by the host: .item(), bool(t) and int(t) all call
    aten._local_scalar_dense, which on a GPU waits for every kernel queued before it."""

    def __init__(self):
        super().__init__()
        self.reads = []  # (function, source line) in model.py

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            frames = [f for f in traceback.extract_stack() if f.filename == MODEL_PY]
            self.reads.append((frames[-1].name, frames[-1].line) if frames else ("elsewhere", ""))
        return func(*args, **(kwargs or {}))


def test_sample_token_reads_nothing_on_the_host():
    """LIMA's sampling never reads a value back, for a nucleus of thousands of tokens or of a few;
    eager decoding reads one a step, generate's check that every row has ended (every step on a CPU,
    every 16th on a GPU), and nothing in the model's forward or the sampler."""
    torch.manual_seed(0)
    seen = torch.zeros(4, 32001, dtype=torch.bool)
    seen[:, :10] = True
    with HostReads() as host:
        for scale in [0.5, 8.0]:
            sample_token(scale * torch.randn(4, 32001), seen)
            sample_token(scale * torch.randn(4, 32001), seen, temperature=1.5, top_p=0.98)
    assert host.reads == []
    model = tiny_model(vocab=100)
    with HostReads() as host:
        steps = sum(1 for _ in generate(model, [[1, 5, 9], [1, 2]], NEVER, 12))
    assert steps == 12 and len(host.reads) == 12
    assert all(name == "generate" and "done.all()" in line for name, line in host.reads), host.reads


# -----------------------------------------------------------------------------
# The command line, on a checkpoint in Meta's layout: params.json, consolidated.00.pth, tokenizer.model


TEXT = ["Plan a trip to Kyoto in spring.", "Day one: temples. Day two: gardens and tea.", "What about food?",
        "Try kaiseki, ramen and matcha sweets.", "How long is the train from Tokyo?", "About two hours.",
        "Kyōto is 京都 in Japanese ☕."]


def train_tokenizer(prefix, vocab, byte_fallback=False):
    spm = pytest.importorskip("sentencepiece")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT * 20), model_prefix=str(prefix), vocab_size=vocab,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, byte_fallback=byte_fallback,
                                   minloglevel=2)
    return Path(f"{prefix}.model")


def save_meta(model, d):
    torch.save({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, d / "consolidated.00.pth")
    (d / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 32,
                                               "norm_eps": 1e-6, "vocab_size": model.args.vocab_size,
                                               "max_seq_len": model.args.max_seq_len}))
    return d


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("meta") / "epoch_03"
    d.mkdir()
    tok = Tokenizer(train_tokenizer(d / "tokenizer", 340, byte_fallback=True))  # like LLaMA's: 256 byte pieces
    (d / "tokenizer.vocab").unlink()
    return save_meta(tiny_model(vocab=tok.n_words, max_seq_len=64), d)


def loaded(ckpt):
    return load_model(ckpt, dtype=torch.float32).eval(), Tokenizer(ckpt / "tokenizer.model")


def sample(*args, cwd=ROOT, stdin=""):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # models this small decode faster on one thread
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), *map(str, args)], cwd=cwd, input=stdin.encode(),
                       capture_output=True, timeout=120, env=env)
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(), r.stderr.decode())  # "\r" kept


def test_cli_answer_streams_the_greedy_decoding(ckpt, tmp_path):
    """A base checkpoint (no tokenizer.model beside it) answers with --tokenizer, as the full forward says."""
    base = tmp_path / "base"
    base.mkdir()
    for f in ["params.json", "consolidated.00.pth"]:
        shutil.copy(ckpt / f, base / f)
    r = sample("hi", "--ckpt", base)
    assert r.returncode == 1 and "pass --tokenizer FILE" in r.stderr and "Traceback" not in r.stderr
    model, tok = loaded(ckpt)
    prompt = "Plan a trip."
    ids, _ = tok.encode_dialogue([prompt])
    answer = greedy_reference(model, ids, 50, 1.2, stop_id=tok.eot_id)
    assert len(ids) + 50 < 64 and tok.eot_id not in answer  # runs to the limit: 50 pieces, most single bytes
    r = sample(prompt, "--ckpt", base, "--tokenizer", ckpt / "tokenizer.model", "--temperature", 0,
               "--max_new_tokens", 50)
    assert r.returncode == 0, r.stderr
    # printed as it grows (spaces, characters split across byte pieces), yet equal to decoding it whole
    assert r.stdout == tok.decode(answer) + "\n"
    assert " " in r.stdout.strip() and "\ufffd" in r.stdout  # spacing and stray bytes as SentencePiece decodes them


def test_cli_prints_a_character_split_across_byte_pieces_whole(ckpt, tmp_path):
    """A model wired to answer with a fixed chain of pieces, whatever the sampling: 東 comes as three byte pieces,
    and the stream must print it as one character, not as replacement characters, then stop at EOT."""
    tok = Tokenizer(ckpt / "tokenizer.model")
    chain = [tok.eot_id] + tok.encode("東京 is Kyōto") + [tok.eot_id]
    assert len(set(chain)) == len(chain) - 1 and tok.sp.id_to_piece(chain[2]) == "<0xE6>"
    model = tiny_model(vocab=tok.n_words, max_seq_len=64)
    with torch.no_grad():
        for layer in model.layers:  # the blocks add nothing: the last state is the last token's embedding
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
        model.tok_embeddings.weight.zero_()
        model.output.weight.zero_()
        for i, (cur, nxt) in enumerate(zip(chain, chain[1:])):
            model.tok_embeddings.weight[cur, i] = 1.0
            model.output.weight[nxt, i] = 10.0  # logit 80 after the norm, every other token 0
    d = tmp_path / "chain"
    d.mkdir()
    shutil.copy(ckpt / "tokenizer.model", d)
    r = sample("Plan a trip.", "--ckpt", save_meta(model, d))  # LIMA's default sampling
    assert (r.returncode, r.stdout) == (0, "東京 is Kyōto\n"), r.stderr


def test_cli_seed_reproducible_and_default_checkpoint(ckpt, tmp_path):
    (tmp_path / "out" / "epoch_2").mkdir(parents=True)  # older and empty: choosing it would fail
    os.utime(tmp_path / "out" / "epoch_2", (1e9, 1e9))
    shutil.copytree(ckpt, tmp_path / "out" / "epoch_10")
    default = sample("Plan a trip.", "--seed", 7, "--max_new_tokens", 25, cwd=tmp_path)
    explicit = sample("Plan a trip.", "--seed", 7, "--max_new_tokens", 25, "--ckpt", ckpt)
    assert default.returncode == explicit.returncode == 0, default.stderr
    assert default.stdout == explicit.stdout and len(default.stdout) > 20  # sampled, yet the same for one seed


def test_cli_default_checkpoint_is_the_most_recently_written(ckpt, tmp_path):
    """A resumed run may rewrite an earlier epoch after a later one: the default is the newest by time, not by
    number (here epoch_10, older and without weights, would fail), and stderr says which it loaded."""
    (tmp_path / "out" / "epoch_10").mkdir(parents=True)
    os.utime(tmp_path / "out" / "epoch_10", (1e9, 1e9))
    shutil.copytree(ckpt, tmp_path / "out" / "epoch_02")
    r = sample("Plan a trip.", "--max_new_tokens", 3, cwd=tmp_path)
    assert r.returncode == 0 and r.stderr == "loading out/epoch_02, the most recently written out/epoch_*\n"


def test_cli_chat_keeps_history_in_cache_and_trims_oldest_turns(ckpt):
    model, tok = loaded(ckpt)
    users = ["Plan a trip to Kyoto.", "What about food?", "And the train from Tokyo?", "Day two?"]
    n, context, room = 10, 64, 10  # --max_new_tokens 10: each answer keeps 10 positions free
    want, turns, trimmed = "", [], False
    for u in users:  # the expected session, each answer decoded from scratch on the trimmed dialogue
        turns.append(tok.encode(u) + [tok.eot_id])
        while 1 + sum(map(len, turns)) + room > context:
            turns, trimmed = turns[2:], True
        answer = greedy_reference(model, [tok.bos_id] + sum(turns, []), n, 1.2, stop_id=tok.eot_id)
        want += "> " + tok.decode(answer) + "\n"
        turns.append(answer if answer[-1] == tok.eot_id else answer + [tok.eot_id])
        want += "> " * (u == users[0])  # the message that does not fit, refused: the history stays
    assert trimmed
    long = " ".join(["Kyoto"] * 70)
    assert len(tok.encode(long)) >= context
    stdin = "\n".join([users[0], long, *users[1:]]) + "\n"
    r = sample("--chat", "--ckpt", ckpt, "--temperature", 0, "--max_new_tokens", n, stdin=stdin)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stdout == want + "> \n"  # Ctrl-D (end of input) leaves cleanly
    assert r.stderr.startswith("error: that message is ") and r.stderr.count("\n") == 1


def test_cli_chat_ctrl_c_leaves_cleanly(ckpt):
    p = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), "--chat", "--ckpt", str(ckpt)], cwd=ROOT,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.read(2) == "> "  # waiting for the user
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0 and "Traceback" not in err and "KeyboardInterrupt" not in err


def test_cli_prompts_file_batches_and_resumes(ckpt, tmp_path):
    model, tok = loaded(ckpt)
    prompts = ["Plan a trip.", "What about food in Kyoto in spring?", "Tea?", "How long is the train?", "Day two"]
    jsonl = tmp_path / "test.jsonl"  # GAIR/lima's test-set format: the prompt is the first turn
    jsonl.write_text("".join(json.dumps({"conversations": [p], "source": "x"}) + "\n" for p in prompts))
    r = sample("--prompts", jsonl, "--output", tmp_path / "a.jsonl", "--ckpt", ckpt, "--temperature", 0,
               "--max_new_tokens", 12, "--batch_size", 2)
    assert r.returncode == 0, r.stderr
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    for p, line in zip(prompts, lines, strict=True):  # batched (padded) answers equal one-at-a-time ones
        answer = greedy_reference(model, tok.encode_dialogue([p])[0], 12, 1.2, stop_id=tok.eot_id)
        stopped = answer[-1] == tok.eot_id
        answer = answer[:-1] if stopped else answer
        assert json.loads(line) == {"prompt": p, "response": tok.decode(answer), "tokens": len(answer),
                                    "stopped_at_eot": stopped}
    # an interrupted run kept two answers: a rerun over the same prompts as text answers only the other three
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n\n")
    (tmp_path / "b.jsonl").write_text("".join(line + "\n" for line in lines[:2]))
    r = sample("--prompts", tmp_path / "prompts.txt", "--output", tmp_path / "b.jsonl", "--ckpt", ckpt,
               "--temperature", 0, "--max_new_tokens", 12, "--batch_size", 2)
    assert r.returncode == 0 and "2 prompts already answered, 3 to go" in r.stderr
    assert (tmp_path / "b.jsonl").read_text() == (tmp_path / "a.jsonl").read_text()


def test_cli_resume_keeps_unicode_line_separators_inside_a_line(ckpt, tmp_path):
    """--output is written with ensure_ascii=False, so an answer may hold U+2028 or U+0085 raw: they are not line
    breaks of the jsonl, nor of a prompt in a text file. Everything answered: nothing decoded, nothing written."""
    prompts = ["Plan a trip.", "Tea\u2028time?"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    answers = "".join(json.dumps({"prompt": p, "response": "Kyoto\u2028in\x85spring", "tokens": 3,
                                  "stopped_at_eot": True}, ensure_ascii=False) + "\n" for p in prompts)
    (tmp_path / "a.jsonl").write_text(answers, encoding="utf-8")
    r = sample("--prompts", tmp_path / "prompts.txt", "--output", tmp_path / "a.jsonl", "--ckpt", ckpt)
    assert r.returncode == 0 and "2 prompts already answered, 0 to go" in r.stderr, r.stderr
    assert (tmp_path / "a.jsonl").read_text(encoding="utf-8") == answers


def test_help_explains_the_penalty():
    r = sample("--help")
    assert r.returncode == 0 and "applies to the tokens already generated in this answer" in " ".join(r.stdout.split())
    assert "positive logits are divided by it and their negative logits multiplied by it" in " ".join(r.stdout.split())


BAD = [  # (arguments, the one line expected on stderr)
    (["hi", "--top_p", "0"], "error: --top_p must be in (0, 1], got 0.0"),
    (["hi", "--top_p", "1.5"], "error: --top_p must be in (0, 1], got 1.5"),
    (["hi", "--temperature", "-0.1"], "error: --temperature must be >= 0, got -0.1"),
    (["hi", "--repetition_penalty", "0.9"], "error: --repetition_penalty must be >= 1 (1 is no penalty), got 0.9"),
    (["hi", "--max_new_tokens", "0"], "error: --max_new_tokens must be >= 1, got 0"),
    (["hi", "--ckpt", "no/such/dir"], "error: --ckpt no/such/dir: no such directory"),
    (["hi"], "error: no checkpoint in out/: make one with `python prepare.py && python train.py`, "
             "or pass --ckpt DIR"),
    (["--prompts", "missing.txt", "--output", "o.jsonl", "--ckpt", "{ckpt}"], "error: --prompts missing.txt: no such file"),
    (["--prompts", "bad.jsonl", "--output", "o.jsonl", "--ckpt", "{ckpt}"],
     'error: bad.jsonl:2: expected a JSON object whose "conversations" list starts with the prompt'),
    (["--prompts", "latin1.txt", "--output", "o.jsonl", "--ckpt", "{ckpt}"],
     "error: latin1.txt: not UTF-8 text (invalid continuation byte at byte 3)"),
    (["hi", "--ckpt", "{ckpt}", "--tokenizer", "other.model"], "error: {ckpt} has 341 tokens, expected 80 (a base "
                                                              "LLaMA) or 81 (with EOT): it was not trained with this tokenizer"),
    (["hi", "--ckpt", "noshard", "--tokenizer", "other.model"], "error: noshard: params.json but no consolidated.NN.pth shard"),
    (["Plan a trip to Kyoto. " * 12, "--ckpt", "{ckpt}"], "error: the prompt is {n} tokens; the model's context is 64"),
    ([os.fsdecode(b"caf\xe9 au lait"), "--ckpt", "{ckpt}"],
     "error: the prompt is not valid UTF-8 text (a lone surrogate)"),
    (["--prompts", "surrogate.jsonl", "--output", "o.jsonl", "--ckpt", "{ckpt}"],
     "error: surrogate.jsonl:1: the prompt is not valid UTF-8 text (a lone surrogate)"),
    (["--prompts", "nested.jsonl", "--output", "o.jsonl", "--ckpt", "{ckpt}"],
     'error: nested.jsonl:1: expected a JSON object whose "conversations" list starts with the prompt'),
    (["--prompts", "good.txt", "--output", ".", "--ckpt", "{ckpt}"],
     "error: --output .: cannot write to it (Is a directory)"),
    (["hi", "--ckpt", "nan"], "error: nan: the weights hold NaN or inf (saved from a diverged run?)"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[m.split(":")[1].split(" ")[1] for _, m in BAD])
def test_cli_refuses_bad_values(ckpt, tmp_path, argv, message):
    (tmp_path / "bad.jsonl").write_text('{"conversations": ["fine"]}\n{"conversations": []}\n')
    (tmp_path / "latin1.txt").write_bytes("café crème\n".encode("latin-1"))
    (tmp_path / "noshard").mkdir()
    shutil.copy(ckpt / "params.json", tmp_path / "noshard")
    (tmp_path / "good.txt").write_text("Plan a trip.\n")
    (tmp_path / "surrogate.jsonl").write_text('{"conversations": ["caf\\ud800"]}\n')
    (tmp_path / "nested.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    if argv[-1] == "nan":  # a diverged run's weights
        file = shutil.copytree(ckpt, tmp_path / "nan") / "consolidated.00.pth"
        weights = torch.load(file, weights_only=True)
        weights["norm.weight"][3] = float("nan")
        torch.save(weights, file)
    train_tokenizer(tmp_path / "other", 80)
    r = sample(*[a.format(ckpt=ckpt) for a in argv], cwd=tmp_path)
    n = len(Tokenizer(ckpt / "tokenizer.model").encode_dialogue([argv[0]])[0]) if "{n}" in message else 0
    assert (r.returncode, r.stderr, r.stdout) == (1, message.format(ckpt=ckpt, n=n) + "\n", "")


def test_demo_model_answers_end_at_eot(demo_run):
    """The tiny demo model (conftest.demo_run: prepare.py, then train.py --size tiny) has learned LIMA's EOT: with
    the default sampling, most answers end on their own rather than at the limit, which is set near the 951-token
    90th percentile of data/sample.jsonl's dialogues."""
    data, out = demo_run
    prompts = [json.loads(line) for line in (ROOT / "data" / "sample.jsonl").read_text().splitlines()][::4][:10]
    (data.parent / "ten.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    r = sample("--prompts", "ten.jsonl", "--output", "answers.jsonl", "--seed", 0, "--batch_size", 10,
               "--max_new_tokens", 1000, cwd=data.parent)  # no --ckpt: the newest out/epoch_*
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (data.parent / "answers.jsonl").read_text().splitlines()]
    assert [row["prompt"] for row in rows] == [p["conversations"][0] for p in prompts]
    assert sum(row["stopped_at_eot"] for row in rows) >= 7, [row["tokens"] for row in rows]
    assert all(row["tokens"] < 1000 if row["stopped_at_eot"] else row["tokens"] == 1000 for row in rows)


def test_prompts_file_is_told_by_content_and_conversations_must_be_a_list(ckpt, tmp_path):
    """GAIR/lima's jsonl named .txt is read as jsonl (the first turn answered, not the raw JSON line); a
    "conversations" that is a string is refused, not answered as its first character."""
    rows = [{"conversations": ["Plan a trip."], "source": ""}, {"conversations": ["Tea?"]}]
    (tmp_path / "lima.txt").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = sample("--prompts", tmp_path / "lima.txt", "--output", tmp_path / "a.jsonl", "--ckpt", ckpt,
               "--temperature", 0, "--max_new_tokens", 4)
    assert r.returncode == 0, r.stderr
    assert [json.loads(line)["prompt"] for line in (tmp_path / "a.jsonl").read_text().splitlines()] == [
        "Plan a trip.", "Tea?"]
    (tmp_path / "string.jsonl").write_text('{"conversations": "abc"}\n')
    r = sample("--prompts", tmp_path / "string.jsonl", "--output", tmp_path / "b.jsonl", "--ckpt", ckpt)
    assert (r.returncode, r.stderr) == (1, f'error: {tmp_path / "string.jsonl"}:1: expected a JSON object whose '
                                           '"conversations" list starts with the prompt\n')


def test_one_writer_per_output_and_a_cut_short_line_is_dropped(ckpt, tmp_path):
    """While one process holds --output, a second is refused in one line; a last line without its newline (a
    write cut short) is dropped on the rerun, which answers that prompt again."""
    (tmp_path / "prompts.txt").write_text("Plan a trip.\nTea?\n")
    output = tmp_path / "a.jsonl"
    whole = json.dumps({"prompt": "Plan a trip.", "response": "x", "tokens": 1, "stopped_at_eot": True}) + "\n"
    output.write_text(whole + '{"prompt": "Tea?", "resp')
    with open(output, "ab") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = sample("--prompts", tmp_path / "prompts.txt", "--output", output, "--ckpt", ckpt)
        assert (r.returncode, r.stderr) == (1, f"error: --output {output}: another sample.py is writing there; "
                                               "wait for it or give another --output\n")
    r = sample("--prompts", tmp_path / "prompts.txt", "--output", output, "--ckpt", ckpt, "--max_new_tokens", 4)
    assert r.returncode == 0 and "dropping a cut-short last line (24 bytes)" in r.stderr, r.stderr
    assert "1 prompts already answered, 1 to go" in r.stderr
    lines = output.read_text().splitlines()
    assert lines[0] == whole.strip() and [json.loads(line)["prompt"] for line in lines] == ["Plan a trip.", "Tea?"]


def test_full_disk_leaves_whole_lines_and_the_rerun_continues(ckpt, tmp_path):
    """--output on a 4 KiB tmpfs that fills up: one line, only whole lines left, and the rerun on a roomy disk
    continues from them."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(disk)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    try:
        prompts = [f"Plan trip number {i}." for i in range(80)]
        (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
        output = disk / "a.jsonl"
        r = sample("--prompts", tmp_path / "prompts.txt", "--output", output, "--ckpt", ckpt, "--max_new_tokens",
                   60, "--batch_size", 4, "--seed", 0)
        assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
            f"error: --output {output}: cannot write to it (No space left on device); rerun to continue")
        kept = output.read_bytes()
        assert kept.endswith(b"\n") and len(kept.splitlines()) % 4 == 0  # whole batches of whole lines
        rows = [json.loads(line) for line in kept.splitlines()]
        roomy = tmp_path / "a.jsonl"
        roomy.write_bytes(kept)
    finally:
        subprocess.run(["umount", str(disk)])
    r = sample("--prompts", tmp_path / "prompts.txt", "--output", roomy, "--ckpt", ckpt, "--max_new_tokens", 60,
               "--batch_size", 4, "--seed", 0)
    assert r.returncode == 0, r.stderr
    assert f"{len(rows)} prompts already answered, {80 - len(rows)} to go" in r.stderr
    assert [json.loads(line)["prompt"] for line in roomy.read_text().splitlines()] == prompts


def test_seeded_answers_depend_on_the_prompt_alone(ckpt, tmp_path):
    """With --seed, LIMA's sampling gives each prompt the same answer at batch size 1 and 8, at any place in the
    file, and in a run interrupted and resumed; one prompt alone streams that answer too."""
    prompts = ["Plan a trip.", "What about food in Kyoto in spring?", "Tea?", "How long is the train?",
               "Day two", "A poem, please.", "Why?", "And the weather?", "Pack what?"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    (tmp_path / "reversed.txt").write_text("\n".join(prompts[::-1]) + "\n")
    flags = ["--ckpt", ckpt, "--seed", 7, "--max_new_tokens", 24]
    answers = {}
    for name, src, batch in (("b8", "prompts.txt", 8), ("b1", "prompts.txt", 1), ("rev", "reversed.txt", 3)):
        r = sample("--prompts", tmp_path / src, "--output", tmp_path / f"{name}.jsonl", "--batch_size", batch, *flags)
        assert r.returncode == 0, r.stderr
        rows = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        answers[name] = {row["prompt"]: row["response"] for row in rows}
    assert answers["b8"] == answers["b1"] == answers["rev"]
    assert len(set(answers["b8"].values())) > 1  # sampled answers, not one constant
    # interrupted after the first batch of 4: the resumed run answers the rest as the uninterrupted one did
    whole = (tmp_path / "b8.jsonl").read_text().splitlines()
    first4 = [line for line in whole if json.loads(line)["prompt"] in prompts[:4]]
    (tmp_path / "resumed.jsonl").write_text("".join(line + "\n" for line in first4))
    r = sample("--prompts", tmp_path / "prompts.txt", "--output", tmp_path / "resumed.jsonl", "--batch_size", 4,
               *flags)
    assert r.returncode == 0 and "4 prompts already answered, 5 to go" in r.stderr, r.stderr
    resumed = [json.loads(line) for line in (tmp_path / "resumed.jsonl").read_text().splitlines()]
    assert {row["prompt"]: row["response"] for row in resumed} == answers["b8"]
    r = sample(prompts[2], *flags)
    assert r.returncode == 0 and r.stdout == answers["b8"][prompts[2]] + "\n"
