"""train.py: identical updates for any world size and micro-batching, the LIMA recipe's settings, fp32 master
weights, epoch checkpoints that load, exact resume, and refusals. Float32, tiny models, CPU (gloo)."""
import fcntl
import functools
import io
import json
import re
import shutil
import subprocess
import sys
import time

import pickle

import pytest
import torch
import torch.distributed as dist
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils.checkpoint import checkpoint

from conftest import ROOT
from checkpoint import load_checkpoint, load_model
from model import ModelArgs, Transformer

SMALL = ["--dim", "64", "--n_layers", "2", "--n_heads", "2", "--dev_samples", "0"]


def train(data, out, *flags, nproc=1, script="train.py"):
    cmd = [sys.executable, str(script), "--data", str(data), "--out", str(out), *map(str, flags)]
    if nproc > 1:  # --standalone: a rendezvous on a free local port, chosen by torchrun itself
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


def refusals(*runs):
    """(exit code, stderr) of train.py for each (data, out, *flags), run at once: refusals are start-up."""
    procs = [subprocess.Popen([sys.executable, "train.py", "--data", data, "--out", out, *map(str, flags)],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for data, out, *flags in runs]
    return [(p.wait(), p.stderr.read()) for p in procs]


def trained(data, out, *flags, nproc=1, script="train.py"):
    r = train(data, out, *flags, nproc=nproc, script=script)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def state(out):
    """The float32 weights and AdamW state of the newest resume point."""
    step = max((out / "resume").glob("step_*"))
    dcp_to_torch_save(step, out / "state.pt")
    return torch.load(out / "state.pt", weights_only=True)


def log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def rel_diff(a, b):
    return max(((a[k] - b[k]).norm() / b[k].norm()).item() for k in b)


# -----------------------------------------------------------------------------
# one optimizer step's global batch of 16 dialogues, cut into micro-batches of <= 200 tokens (about 5 dialogues):
# 3-4 of them, so two ranks get unequal shares and one runs an empty turn
THREE_STEPS = [*SMALL, "--steps", "3", "--batch_size", "16", "--lr", "1e-3", "--tokens_per_micro", "200"]


@pytest.fixture(scope="module")
def one_process(toy_data, tmp_path_factory):
    out = trained(toy_data[0], tmp_path_factory.mktemp("single"), *THREE_STEPS, "--peak_flops", "1e9")
    return {**state(out), "pad": [row["pad"] for row in log(out) if "step" in row], "out": out}


def test_fsdp_processes_equal_one_and_resume_on_more(one_process, toy_data, tmp_path):
    """FSDP2 on 2 ranks; on 3 ranks recomputing activations (step 3 has 2 micro-batches: the third rank has none);
    and the 2-rank run resumed on 3 ranks for a 4th step (DCP reshards weights and AdamW state), against 1 process."""
    two = state(trained(toy_data[0], tmp_path / "two", *THREE_STEPS, nproc=2))
    assert rel_diff(two["model"], one_process["model"]) <= 1e-5
    three = state(trained(toy_data[0], tmp_path / "three", *THREE_STEPS, "--act_ckpt", "1", nproc=3))
    assert rel_diff(three["model"], one_process["model"]) <= 1e-5
    for out, nproc in ((tmp_path / "two", 3), (shutil.copytree(one_process["out"], tmp_path / "one"), 1)):
        trained(toy_data[0], out, *THREE_STEPS, "--steps", "4", "--resume", nproc=nproc)
    assert rel_diff(state(tmp_path / "two")["model"], state(tmp_path / "one")["model"]) <= 1e-5
    assert [row["world_size"] for row in log(tmp_path / "two") if "config" in row] == [2, 3]
    assert [row["step"] for row in log(tmp_path / "two") if "step" in row] == [1, 2, 3, 4]


def test_mfu_counts_attention(one_process, toy_data):
    """With --peak_flops, MFU = FLOPs / (seconds * peak * ranks): per token 6 per matmul weight, plus attention's
    12 * layers * dim * T for a dialogue of T tokens, so between the shortest and the longest dialogue's count."""
    rows = [row for row in log(one_process["out"]) if "step" in row]
    lengths = [len(ids) - 1 for ids in torch.load(toy_data[0] / "train.pt", weights_only=True)["ids"]]
    model = Transformer(ModelArgs.from_size("tiny", vocab_size=97, dim=64, n_layers=2, n_heads=2))
    matmul = sum(q.numel() for q in model.parameters()) - model.tok_embeddings.weight.numel()  # a lookup: no FLOPs
    layers, dim = 2, 64
    for row in rows:
        per_token = row["mfu"] * 1e9 * row["tokens"] / row["tokens_per_s"] / row["tokens"]
        assert 6 * matmul + 12 * layers * dim * min(lengths) < per_token * (1 - 1e-3)
        assert per_token * (1 + 1e-3) < 6 * matmul + 12 * layers * dim * max(lengths)


def peak_memory_per_rank(world, args):
    """Peak bytes of one rank over a training step (the second: AdamW's state exists), train.py's FSDP2 wrapping
    with recomputation, on a simulated process group of `world` ranks."""
    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    try:
        with torch.device("meta"):
            model = Transformer(args)
        mp = MixedPrecisionPolicy(reduce_dtype=torch.float32, cast_forward_inputs=False)
        for block in model.layers:
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        model.to_empty(device="cpu")
        optimizer = torch.optim.AdamW(model.parameters())
        tracker = FSDPMemTracker(model, optimizer)
        with tracker:
            for _ in range(2):
                tracker.reset_mod_stats()
                model(torch.zeros(1, 128, dtype=torch.long)).float().sum().backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    finally:
        dist.destroy_process_group()


def test_memory_per_rank_falls_as_planned():
    """The README's plan: a rank holds 16 bytes per parameter / world (float32 weights, gradients, AdamW's two
    moments) plus what world does not shrink (gathered blocks, activations, logits). So peak(1) - peak(2) is twice
    peak(2) - peak(4) (to 3%), and 2 * (peak(1) - peak(2)) is 16 bytes per parameter, less at most one block's
    gradients, still unreduced at the peak."""
    args = ModelArgs(dim=128, n_layers=8, n_heads=4, vocab_size=97, max_seq_len=128)
    n = sum(q.numel() for q in Transformer(args).parameters())
    p1, p2, p4 = (peak_memory_per_rank(world, args) for world in (1, 2, 4))
    assert abs((p1 - p2) / (p2 - p4) - 2) < 0.06
    assert 16 * n * (1 - 1 / args.n_layers) < 2 * (p1 - p2) <= 16 * n


def test_micro_batch_budget_does_not_change_the_update(one_process, toy_data, tmp_path):
    whole = state(trained(toy_data[0], tmp_path, *THREE_STEPS, "--tokens_per_micro", "100000"))
    assert rel_diff(whole["model"], one_process["model"]) <= 1e-5
    # one micro-batch pads every dialogue to the step's longest; the 200-token budget groups similar lengths
    pad = [row["pad"] for row in log(tmp_path) if "step" in row]
    assert all(a < b for a, b in zip(one_process["pad"], pad)) and len(pad) == 3


def test_weight_decay_groups_and_lr_start(one_process, toy_data):
    groups = one_process["optim"]["param_groups"]
    decay = {name for g in groups if g["weight_decay"] == 0.1 for name in g["params"]}
    no_decay = {name for g in groups if g["weight_decay"] == 0.0 for name in g["params"]}
    assert no_decay == {"norm.weight"} | {f"layers.{i}.{n}_norm.weight" for i in range(2) for n in ("attention", "ffn")}
    assert "tok_embeddings.weight" in decay and "output.weight" in decay and "layers.1.feed_forward.w2.weight" in decay
    assert len(decay) == 2 + 2 * 7 and all(g["betas"] == (0.9, 0.95) for g in groups)


def test_lima_defaults_and_fp32_master_weights_under_bf16(toy_data, tmp_path, resumed):
    """--init a checkpoint: LIMA §3's settings for smaller models, and bf16 compute keeping float32 weights
    and AdamW state, so a 1e-5 step survives (bf16 would round it away: its spacing near 0.02 is 1.2e-4)."""
    init = resumed / "epoch_02"
    out = trained(toy_data[0], tmp_path, "--init", str(init), "--dtype", "bfloat16", "--steps", "1",
                  "--dev_samples", "0")
    config = log(out)[0]
    assert log(out)[0]["compute_dtype"] == "bfloat16"
    assert {k: config["config"][k] for k in ("epochs", "lr", "min_lr", "batch_size", "dropout", "act_ckpt")} == \
        dict(epochs=15, lr=1e-5, min_lr=1e-6, batch_size=64, dropout=0.2, act_ckpt=1)
    assert log(out)[1]["lr"] == 1e-5
    after = state(out)
    start = load_checkpoint(init)[1]
    w0, w1 = start["layers.0.attention.wq.weight"].float(), after["model"]["layers.0.attention.wq.weight"]
    assert w1.dtype == torch.float32 and after["optim"]["state"]["output.weight"]["exp_avg_sq"].dtype == torch.float32
    moved = (w1 - w0).abs()
    assert 0.9e-5 < moved.median() < 1.1e-5  # Adam's first step is lr * sign(gradient)
    assert (w1.bfloat16().float() != w1).float().mean() > 0.9  # not representable in bf16


# -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resumed(toy_data, tmp_path_factory):
    """Two epochs of 3 steps with dropout 0.3, stopped after the first epoch and resumed."""
    out = tmp_path_factory.mktemp("resumed")
    flags = [*SMALL, "--epochs", "2", "--batch_size", "16", "--dropout", "0.3", "--save_epochs", "all"]
    trained(toy_data[0], out, *flags, "--steps", "3")
    assert not (out / "epoch_02").exists() and (out / "resume" / "step_000003").is_dir()
    trained(toy_data[0], out, *flags, "--resume")
    return out


def test_resume_equals_uninterrupted(toy_data, resumed, tmp_path):
    flags = [*SMALL, "--epochs", "2", "--batch_size", "16", "--dropout", "0.3", "--save_epochs", "all"]
    straight = trained(toy_data[0], tmp_path, *flags)
    a, b = state(resumed), state(straight)
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert torch.equal(a["optim"]["state"]["output.weight"]["exp_avg"], b["optim"]["state"]["output.weight"]["exp_avg"])
    losses = lambda out: [row["loss"] for row in log(out) if "step" in row]
    assert losses(resumed) == losses(straight) and len(losses(straight)) == 6


def test_dropout_rises_per_layer(resumed):
    args = load_checkpoint(resumed / "epoch_02")[0]
    assert args.vocab_size == 97 and args.dim == 64 and log(resumed)[0]["config"]["dropout"] == 0.3
    model = load_model(resumed / "epoch_02", dropout=0.3)
    assert [block.dropout for block in model.layers] == [0.0, 0.3]


# -----------------------------------------------------------------------------
def test_tiny_demo_learns_and_its_checkpoint_loads(demo_run):
    data, out = demo_run
    rows = log(out)
    steps = [row for row in rows if "step" in row]
    config = rows[0]["config"]
    assert steps[0]["lr"] == config["lr"] and abs(steps[-1]["lr"] - config["min_lr"]) < 1e-12  # linear, no warmup
    assert steps[0]["loss"] > 7.0  # about ln(2001): nothing learned yet
    last_epoch = [row["loss"] for row in steps if row["epoch"] == steps[-1]["epoch"]]
    assert sum(last_epoch) / len(last_epoch) < steps[0]["loss"] - 1.0
    dev = [row["dev_loss"] for row in rows if "dev_loss" in row]
    assert dev[-1] < dev[0]
    ckpt = max(out.glob("epoch_*"))
    assert (ckpt / "config.json").is_file() and (ckpt / "model.safetensors.index.json").is_file()
    assert (ckpt / "tokenizer.model").read_bytes() == (data / "tokenizer.model").read_bytes()
    samples = [json.loads(line) for line in (ckpt / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and all(isinstance(s["response"], str) for s in samples)
    # the epoch checkpoint is the trained float32 model rounded to bf16
    loaded = load_model(ckpt, dtype=torch.float32).eval()
    fp32 = state(out)["model"]
    reference = Transformer(loaded.args).eval()
    reference.load_state_dict({k: v.bfloat16().float() for k, v in fp32.items()})
    tokens = torch.load(data / "dev.pt", weights_only=True)["ids"][0][None, :64]
    with torch.no_grad():
        assert torch.allclose(loaded(tokens), reference(tokens), rtol=0, atol=1e-5)
    assert not torch.equal(loaded.output.weight, fp32["output.weight"])  # bf16 really rounded it


# -----------------------------------------------------------------------------
def test_any_base_model_gets_limas_recipe(toy_data, tmp_path):
    """A Hugging Face model of no LLaMA-1 shape, saved by transformers, is fine-tuned with LIMA's recipe for
    smaller models (under 10B parameters: batch 64, dropout 0.2), and the log and progress output say so;
    --size names LLaMA-1's shapes and is refused when the model has another."""
    from test_model import hf_model

    hf_model().save_pretrained(tmp_path / "hf")
    r = train(toy_data[0], tmp_path / "out", "--init", tmp_path / "hf", "--steps", 1, "--dev_samples", 0)
    assert r.returncode == 0, r.stderr[-3000:]
    first = log(tmp_path / "out")[0]
    assert {k: first["config"][k] for k in ("epochs", "lr", "min_lr", "batch_size", "dropout")} == \
        dict(epochs=15, lr=1e-5, min_lr=1e-6, batch_size=64, dropout=0.2)
    preset = f"LIMA's for smaller models (under 10B parameters): {tmp_path / 'hf'} has 0.00B"
    assert first["preset"] == preset
    assert f"recipe: {preset}; 15 epochs, batch 64, lr 1e-05 to 1e-06" in r.stderr
    assert "train (LIMA's recipe)" in r.stderr
    assert refusals((toy_data[0], tmp_path / "a", "--init", tmp_path / "hf", "--size", "7B"),
                    (toy_data[0], tmp_path / "b", "--size", "65B")) == [
        (1, f"error: --size 7B: {tmp_path / 'hf'} is not LLaMA-1 7B (dim 64, 2 layers, 4 heads, 0.00B "
            "parameters); leave out --size to fine-tune it as it is\n"),
        (1, "error: --init llama/65B: no such directory (--size 65B fine-tunes llama/65B unless --init names "
            "another)\n")]


def test_refusals(toy_data, resumed, tmp_path):
    data, other = toy_data
    r = train(tmp_path / "nowhere", tmp_path / "b")
    assert r.returncode == 1 and r.stderr.strip() == (
        f"error: --data {tmp_path / 'nowhere'}: no such directory (make it with: python prepare.py --out {tmp_path / 'nowhere'})")
    # data tokenized with another vocabulary than the checkpoint's: its tokenizer.model differs ...
    r = train(other, tmp_path / "c", "--init", str(resumed / "epoch_02"))
    assert r.returncode == 1 and "differs from" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # ... and without a tokenizer.model beside the checkpoint, its vocabulary size does not fit
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in (resumed / "epoch_02").glob("[cm]*.*"):  # config.json, model*.safetensors and their index
        (bare / f.name).write_bytes(f.read_bytes())
    r = train(other, tmp_path / "d", "--init", str(bare))
    assert r.returncode == 1 and r.stderr.strip() == (
        f"error: {bare} has 97 tokens, expected 80 (a base LLaMA) or 81 (with EOT): "
        "it was not trained with this tokenizer")
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_bad_flag_values(toy_data, tmp_path):
    for flags, message in [(["--batch_size", "0"], "error: --batch_size 0: expected >= 1"),
                           (["--dropout", "1.5"], "error: --dropout 1.5: expected in [0, 1)"),
                           (["--max_len", "8"], f"error: {toy_data[0] / 'train.pt'}: no dialogue with an answer token "
                                                "within --max_len 8")]:
        r = train(toy_data[0], tmp_path / "out", *SMALL, *flags)
        assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == message and "Traceback" not in r.stderr
        assert not (tmp_path / "out").exists()


SPY = """import os, runpy, sys
sys.path.insert(0, ".")  # the repository, where train.py runs
import model
seen, rope = set(), model.apply_rope
def spy(x, cos, sin):
    seen.add((str(x.dtype), str(cos.dtype), str(sin.dtype)))
    return rope(x, cos, sin)
model.apply_rope = spy
sys.argv = ["train.py", *sys.argv[1:]]
end = os._exit  # where a distributed train.py ends
# one write a rank: the ranks share torchrun's stdout, unbuffered, and end together
os._exit = lambda code: (os.write(1, f"rope dtypes (x, cos, sin): {sorted(seen)}\\n".encode()), end(code))
runpy.run_path("train.py", run_name="__main__")
"""


def test_dev_samples_in_lockstep_across_ranks_and_rope_in_float32(toy_data, tmp_path):
    """Two FSDP ranks computing in bf16 share 3 dev prompts unequally (2 and 1): the rank done first keeps joining
    the other's weight gathers, and rank 0 writes every answer in prompt order. In training and sampling, every
    block rotates its bf16 queries and keys with float32 RoPE tables (FSDP2 casts no block inputs), as sample.py."""
    (tmp_path / "spy.py").write_text(SPY)
    flags = [*SMALL[:-2], "--epochs", "1", "--batch_size", "16", "--save_epochs", "1", "--dtype", "bfloat16",
             "--dev_samples", "3", "--max_new_tokens", "12"]
    r = train(toy_data[0], tmp_path / "out", *flags, nproc=2, script=tmp_path / "spy.py")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("rope dtypes (x, cos, sin): [('torch.bfloat16', 'torch.float32', 'torch.float32')]") == 2
    rows = [json.loads(line) for line in (tmp_path / "out" / "epoch_01" / "samples.jsonl").read_text().splitlines()]
    dev = torch.load(toy_data[0] / "dev.pt", weights_only=True)["conversations"]
    assert [r["prompt"] for r in rows] == [c[0] for c in dev[:3]]
    assert all(isinstance(r["response"], str) and r["epoch"] == 1 for r in rows)


LOGITS_SPY = """import runpy, sys, weakref
sys.path.insert(0, ".")  # the repository, where train.py runs
import torch, torch.nn.functional as F
logits, live, ce, backward = [], [], F.cross_entropy, torch.Tensor.backward
def cross_entropy(x, *args, **kw):  # x: a view of the micro-batch's logits
    logits.append(weakref.ref(x if x._base is None else x._base))
    return ce(x, *args, **kw)
def spy_backward(self, *args, **kw):
    live.append(logits[-1]() is not None)
    return backward(self, *args, **kw)
F.cross_entropy, torch.Tensor.backward = cross_entropy, spy_backward
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
print("backward passes:", len(live), "with the logits alive:", sum(live))
"""


def test_logits_are_freed_before_each_backward(toy_data, tmp_path):
    """The memory plan counts one micro-batch's logits once (bf16, float32, log-softmax, gradient): by the
    time its loss is backpropagated, nothing holds the logits tensor itself, which autograd does not need."""
    (tmp_path / "spy.py").write_text(LOGITS_SPY)
    flags = [*SMALL, "--steps", "1", "--batch_size", "16", "--tokens_per_micro", "200"]  # 3-4 micro-batches
    r = train(toy_data[0], tmp_path / "out", *flags, script=tmp_path / "spy.py")
    assert r.returncode == 0, r.stderr[-3000:]
    counts = re.search(r"backward passes: (\d+) with the logits alive: (\d+)", r.stdout).groups()
    assert int(counts[0]) >= 3 and counts[1] == "0", r.stdout[-500:]


RESUMED = [*SMALL, "--epochs", "2", "--batch_size", "16", "--dropout", "0.3", "--save_epochs", "all"]


def test_a_run_owns_its_out(toy_data, resumed, tmp_path):
    """A fresh run into another run's --out is refused and leaves it as it was; while a train.py holds
    OUT/.lock (here this test holds it), a second one into the same --out is refused."""
    out = shutil.copytree(resumed, tmp_path / "out")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert refusals((toy_data[0], out, *RESUMED), (toy_data[0], out, *RESUMED, "--resume")) == [
            (1, f"error: --out {out} holds another run (log.jsonl, resume/, epoch_NN/): continue it with "
                "--resume, or give a fresh --out\n"),
            (1, f"error: --out {out}: another train.py is writing there (it holds {out}/.lock); wait for it "
                "or give another --out\n")]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_resume_refuses_what_it_cannot_honour(toy_data, resumed, tmp_path):
    """Each setting the saved state depends on, changed on --resume, is refused by name; a damaged state (a
    truncated shard) is one line."""
    out = shutil.copytree(resumed, tmp_path / "out")
    step = out / "resume" / "step_000006"
    damaged = shutil.copytree(out, tmp_path / "damaged") / "resume" / "step_000006"
    (damaged / "__0_0.distcp").write_bytes((step / "__0_0.distcp").read_bytes()[:1000])
    flipped = shutil.copytree(out, tmp_path / "flipped") / "resume" / "step_000006"
    shard = bytearray((step / "__0_0.distcp").read_bytes())
    shard[len(shard) // 2] ^= 1  # one bit in the middle of the weights
    (flipped / "__0_0.distcp").write_bytes(shard)
    data, other = toy_data
    changed = {"batch_size": (16, 20), "epochs": (2, 3), "seed": (1337, 1), "weight_decay": (0.1, 0.05),
               "dtype": ("float32", "bfloat16")}
    runs = [(data, out, *RESUMED, "--resume", f"--{k}", new) for k, (old, new) in changed.items()]
    runs += [(other, out, *RESUMED, "--resume"), (data, out, *RESUMED, "--resume", "--dim", 32),
             (data, damaged.parent.parent, *RESUMED, "--resume"),
             (data, flipped.parent.parent, *RESUMED, "--resume")]
    tail = "; resume with the same settings, or give a fresh --out\n"
    got = refusals(*runs)
    assert got[:7] == [(1, f"error: --resume: {step} was trained with {why}{tail}") for why in [
        *(f"--{k} {old}, not {new}" for k, (old, new) in changed.items()),
        f"other data than --data {other} (its train.pt and dev.pt differ)", "another model: dim 64, not 32"]]
    for state in (damaged, flipped):  # truncated, or one bit changed: the checksum says which file
        assert got.pop(7) == (1, f"error: --resume: {state / '__0_0.distcp'}: its bytes differ from those "
                                 "saved (its SHA-256 is not sha256.json's): the resume state is damaged\n")
    assert {p.name for p in out.iterdir()} == {p.name for p in resumed.iterdir()}


class Planted:  # unpickling it creates a file
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_planted_resume_metadata_runs_no_code(toy_data, resumed, tmp_path):
    """DCP's .metadata is a pickle, and DCP unpickles an entry it lists as "bytes" with plain pickle: a
    planted .metadata, or a genuine-looking one whose tensor entry points at a planted pickle, is refused, and
    the file their unpickling would create does not appear."""
    a, b = (shutil.copytree(resumed, tmp_path / name) / "resume" / "step_000006" for name in ("a", "b"))
    (a / ".metadata").write_bytes(pickle.dumps(Planted(tmp_path / "a.pwned")))
    metadata = pickle.loads((b / ".metadata").read_bytes())  # written by train.py: trusted here
    buf = io.BytesIO()
    torch.save(Planted(tmp_path / "b.pwned"), buf)
    (b / "planted.distcp").write_bytes(buf.getvalue())
    metadata.state_dict_metadata["model.norm.weight"] = BytesStorageMetadata()
    metadata.storage_data[MetadataIndex("model.norm.weight")] = _StorageInfo("planted.distcp", 0, buf.tell())
    (b / ".metadata").write_bytes(pickle.dumps(metadata))
    for planted in (a, b):  # sha256.json would refuse them first: whoever plants files can drop it
        (planted / "sha256.json").unlink()
    (ra, ea), (rb, eb) = refusals(*((toy_data[0], s.parent.parent, *RESUMED, "--resume") for s in (a, b)))
    assert ra == rb == 1 and ea.count("\n") == eb.count("\n") == 1
    assert ea.startswith(f"error: --resume: {a} cannot be loaded (")
    assert "io.open has no place in a checkpoint's metadata" in ea
    assert eb == f"error: --resume: {b} cannot be loaded (RuntimeError('Missing key in checkpoint " \
                 "state_dict: model.norm.weight.'))\n"
    assert not list(tmp_path.glob("*.pwned"))


def test_divergence_at_an_epochs_last_step_saves_nothing(toy_data, tmp_path):
    """lr 1e30 makes the weights non-finite at step 2, the last of epoch 1 (20 of 40 dialogues a step): the
    run stops there, before the epoch's checkpoint and resume state would be written from them."""
    r = train(toy_data[0], tmp_path, *SMALL, "--batch_size", 20, "--lr", 1e30, "--epochs", 2, "--save_epochs",
              "all")
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
        f"error: non-finite weights at step 2 (epoch 1); stopped before saving it: everything in {tmp_path} "
        "is from before it")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "log.jsonl"]


def test_non_finite_loss_stops_the_run(toy_data, tmp_path):
    r = train(toy_data[0], tmp_path, *SMALL, "--batch_size", "16", "--lr", "1e30", "--epochs", "1")
    assert r.returncode == 1 and "error: non-finite loss at step 3 (epoch 1)" in r.stderr
    assert not list(tmp_path.glob("epoch_*")) and not (tmp_path / "resume").exists()


NODES = """import os, runpy, sys
how, elsewhere, repository = sys.argv[1:4]
sys.path.insert(0, repository)
os.environ["LOCAL_WORLD_SIZE"] = "1"  # as if each rank were a node of its own
if os.environ["RANK"] == "1" and how == "apart":  # a node whose --out is another directory
    os.chdir(elsewhere)
sys.argv = ["train.py", *sys.argv[4:]]
runpy.run_path(os.path.join(repository, "train.py"), run_name="__main__")
"""


def test_several_nodes_must_share_out(toy_data, tmp_path):
    """Under torchrun on several nodes, every rank checks at start-up that it sees rank 0's --out: a rank
    that sees another directory (its --out not on a shared filesystem) stops the run before training."""
    (tmp_path / "nodes.py").write_text(NODES)
    (tmp_path / "node0").mkdir()
    (tmp_path / "node1").mkdir()
    flags = [*SMALL, "--steps", "1", "--batch_size", "16"]
    runs = {}
    for how in ("apart", "shared"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(tmp_path / "nodes.py"), how, str(tmp_path / "node1"), str(ROOT), "--data",
               str(toy_data[0]), "--out", f"out_{how}", *flags]  # --out relative to each rank's cwd
        runs[how] = subprocess.run(cmd, cwd=tmp_path / "node0", capture_output=True, text=True)
    apart = runs["apart"]
    assert apart.returncode != 0
    assert ("error: --out out_apart: 1 of 2 ranks do not see rank 0's files there: on several nodes --out "
            "must be on a filesystem every node shares") in apart.stderr
    assert not list((tmp_path / "node0" / "out_apart").iterdir())  # no log, no lock, no token left
    shared = runs["shared"]
    assert shared.returncode == 0, shared.stderr[-2000:]
    assert (tmp_path / "node0" / "out_shared" / "resume" / "step_000001").is_dir()
    assert not list((tmp_path / "node0" / "out_shared").glob(".shared_*"))


def test_a_run_killed_before_its_first_save_resumes_and_logs_each_step_once(toy_data, tmp_path):
    """No dead end: a run killed during its first resume save (epoch_01 whole, no step_N yet) continues with
    --resume from step 0, keeping the epoch; a run killed after logging steps past its last save logs each
    step once after --resume; a train.pt that is not prepare.py's is one line."""
    flags = [*SMALL, "--epochs", "2", "--batch_size", "16", "--save_epochs", "all"]
    straight = trained(toy_data[0], tmp_path / "straight", *flags)
    dead = shutil.copytree(straight, tmp_path / "dead")  # as a kill in dcp.save of step 3 leaves it
    for step in (dead / "resume").iterdir():
        shutil.rmtree(step)
    (dead / "resume" / ".tmp_step_000003").mkdir()
    shutil.rmtree(dead / "epoch_02")
    lines = (dead / "log.jsonl").read_text().splitlines()
    (dead / "log.jsonl").write_text("".join(line + "\n" for line in lines[:5]))  # config, 3 steps, epoch 1
    r = train(toy_data[0], dead, *flags, "--resume")
    assert r.returncode == 0 and "nothing saved in" in r.stderr and "starting again from step 0" in r.stderr
    again, want = state(dead)["model"], state(straight)["model"]
    assert want.keys() == again.keys() and all(torch.equal(again[k], want[k]) for k in want)
    assert [row["step"] for row in log(dead) if "step" in row] == [1, 2, 3, 4, 5, 6]
    # killed after logging steps 4 and 5, whose state was never saved: they are logged once
    replay = shutil.copytree(straight, tmp_path / "replay")
    trained(toy_data[0], tmp_path / "three", *flags, "--steps", "3")
    shutil.rmtree(replay / "resume")
    shutil.copytree(tmp_path / "three" / "resume", replay / "resume")
    rows = (replay / "log.jsonl").read_text().splitlines()
    (replay / "log.jsonl").write_text("".join(line + "\n" for line in rows[:7]) + '{"step": 6, "los')
    trained(toy_data[0], replay, *flags, "--resume")
    assert [row["step"] for row in log(replay) if "step" in row] == [1, 2, 3, 4, 5, 6]
    assert [row["epoch"] for row in log(replay) if "dev_loss" in row and "step" not in row] == [1, 2]
    bad = shutil.copytree(toy_data[0], tmp_path / "bad")
    torch.save([1, 2], bad / "train.pt")
    r = train(bad, tmp_path / "out", *SMALL)
    assert (r.returncode, r.stderr.strip()) == (1, f"error: {bad / 'train.pt'} is not prepare.py's output (ids, "
                                                   "mask and conversations); rerun prepare.py")


def test_full_disk_while_saving_is_one_line_and_resumable(toy_data, tmp_path):
    """--out on a 1 MiB tmpfs: the epoch (bf16) fits, the resume state (float32 weights and AdamW's moments)
    does not. One line, no half-written state left; with room again, the same command with --resume continues."""
    out = tmp_path / "out"
    out.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(out)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    try:
        flags = [*SMALL, "--epochs", "1", "--batch_size", "16", "--save_epochs", "all"]
        r = train(toy_data[0], out, *flags)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert r.stderr.strip().splitlines()[-1] == (
            f"error: {out / 'resume' / '.tmp_step_000003'}: cannot write the resume state (No space left on "
            f"device); the last one in {out / 'resume'} stays: free space and rerun with --resume")
        assert (out / "epoch_01" / "config.json").exists() and not list((out / "resume").iterdir())
        subprocess.run(["mount", "-o", "remount,size=64m", str(out)], check=True)
        r = train(toy_data[0], out, *flags, "--resume")
        assert r.returncode == 0, r.stderr[-2000:]
        assert (out / "resume" / "step_000003" / "sha256.json").exists()
    finally:
        subprocess.run(["umount", str(out)])


ONE_FULL_DISK = """import errno, os, runpy, sys
sys.path.insert(0, ".")  # the repository, where train.py runs
real_fsync = os.fsync
def fsync(fd):  # rank 1's disk alone is full
    if os.environ["RANK"] == "1":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    real_fsync(fd)
os.fsync = fsync
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


def test_under_torchrun_a_refusal_is_said_once_and_one_ranks_failure_stops_all(toy_data, tmp_path):
    """Every rank meets a bad flag (before torch loads) or a missing --data (after the processes
    start): rank 0 says it once and torchrun stops the others at once. A full disk on rank 1 alone,
    while rank 0 waits for it at a barrier, is said by rank 1, and the run ends in seconds, not at
    the barrier's 1 h timeout, with no epoch written."""
    for flags, message in [(["--batch_size", "0"], "error: --batch_size 0: expected >= 1"),
                           (["--data", tmp_path / "nowhere"], f"error: --data {tmp_path / 'nowhere'}: ")]:
        r = train(toy_data[0], tmp_path / "out", *SMALL, *flags, nproc=3)
        assert r.returncode != 0 and r.stderr.count(message) == 1, r.stderr[-2000:]
        # the others, still waiting to say it, were stopped by torchrun (SIGTERM, in its report)
        assert r.stderr.count("error:") == 1 and r.stderr.count("exitcode  : -15") == 2
    (tmp_path / "one_full_disk.py").write_text(ONE_FULL_DISK)
    start = time.monotonic()
    r = train(toy_data[0], tmp_path / "out", *SMALL, "--epochs", "1", "--batch_size", "16", nproc=2,
              script=tmp_path / "one_full_disk.py")
    assert r.returncode != 0 and time.monotonic() - start < 120
    assert r.stderr.count(f"error: {tmp_path / 'out' / '.tmp_epoch_01'}: cannot write epoch 1 (No space left "
                          "on device)") == 1, r.stderr[-2000:]
    assert not (tmp_path / "out" / "epoch_01").exists()
