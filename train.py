"""
Fine-tune LLaMA on LIMA's dialogues with the plain next-token loss (Zhou et al., 2023, §3).

    python train.py                                                     # the CPU demo: a tiny model from scratch
    torchrun --nproc_per_node 8 train.py --size 7B --data data/lima        # llama/7B, LLaMA-1 7B
    torchrun --nproc_per_node 8 train.py --init TinyLlama-1.1B --data data/lima  # any LLaMA-family base model
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        train.py --size 65B --data data/lima

Master weights and AdamW state stay in float32 (LIMA's 1e-6 updates vanish in bf16 weights); on CUDA the
arithmetic runs in bf16. Under torchrun FSDP2 shards weights, gradients and AdamW state, one unit per block.
"""
import argparse, fcntl, functools, hashlib, io, json, logging, math, os, pickle, shutil, sys, time, warnings
from contextlib import nullcontext
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                     set_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from torch.distributed.checkpoint import CheckpointException, metadata as dcp_metadata

from model import (CheckpointError, ModelArgs, Tokenizer, Transformer, _hf_name, expected_shapes, generate,
                   hf_files, hf_rotary_order)

p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
p.add_argument("--size", help="LLaMA-1's 7B, 13B, 33B (30B) or 65B: fine-tunes llama/SIZE unless --init "
               "names it; tiny (the default without --init): the CPU demo, from scratch")
p.add_argument("--init", help="pretrained LLaMA-family directory, Meta or Hugging Face layout, any size: "
               "fine-tuned with LIMA's recipe")
p.add_argument("--data", default="data/prepared", help="prepare.py's output")
p.add_argument("--out", default="out")
p.add_argument("--epochs", type=int, help="LIMA: 15")
p.add_argument("--lr", type=float, help="LIMA: 1e-5 at the first step, no warmup")
p.add_argument("--min_lr", type=float, help="LIMA: 1e-6 at the last step, linearly")
p.add_argument("--batch_size", type=int, help="dialogues per optimizer step; LIMA: 32, 64 under 10B")
p.add_argument("--dropout", type=float, help="residual dropout at the top layer; LIMA: 0.3, 0.2 under 10B")
p.add_argument("--weight_decay", type=float, default=0.1)
p.add_argument("--beta1", type=float, default=0.9)
p.add_argument("--beta2", type=float, default=0.95)
p.add_argument("--max_len", type=int, default=2048, help="trim dialogues to this many tokens")
p.add_argument("--tokens_per_micro", type=int, default=2048, help="tokens (padding included) per forward pass")
p.add_argument("--act_ckpt", type=int, choices=[0, 1], help="recompute activations in backward; default: 1 for 7B+")
p.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype; default: bfloat16 on CUDA")
p.add_argument("--dev_samples", type=int, default=50, help="dev prompts answered at each saved epoch")
p.add_argument("--max_new_tokens", type=int, help="per dev answer; LIMA: 2048, here a preview of 128")
p.add_argument("--save_epochs", default="5-10", help='"5-10" (LIMA\'s choice), "all" or "1,3,7"; last always')
p.add_argument("--resume", action="store_true", help="continue from OUT/resume/")
p.add_argument("--seed", type=int, default=1337)
p.add_argument("--peak_flops", type=float, help="a GPU's dense bf16 FLOP/s for the MFU; default: known GPUs'")
p.add_argument("--steps", type=int, help="stop (resumably) after this many optimizer steps in total")
for k in ("dim", "n_layers", "n_heads"):
    p.add_argument(f"--{k}", type=int, help="tiny only: the model's shape")
args = p.parse_args()

# LIMA §3 for any pretrained model: batch 64 and dropout 0.2 for "smaller models" (the paper names 7B; here:
# under 10B parameters), 32 and 0.3 above; dev answers are a 128-token preview (README: LIMA's 2,048 cost
# hours at 65B). tiny learns from scratch on a CPU in minutes: far larger steps
LIMA = dict(epochs=15, lr=1e-5, min_lr=1e-6, act_ckpt=1, max_new_tokens=128)
TINY = dict(epochs=10, lr=3e-3, min_lr=3e-4, batch_size=4, dropout=0.0, act_ckpt=0,
            max_new_tokens=256)
SMALLER, LARGER = dict(batch_size=64, dropout=0.2), dict(batch_size=32, dropout=0.3)
fail = lambda msg: sys.exit(f"error: {msg}")  # one line, no traceback
fill = lambda preset: vars(args).update({k: v for k, v in preset.items() if vars(args)[k] is None})
if args.size not in (None, "tiny", "7B", "13B", "30B", "33B", "65B"):
    fail(f"--size {args.size}: expected 7B, 13B, 33B (or 30B), 65B or tiny; another base model: --init DIR")
if args.size == "tiny" and args.init:
    fail("--size tiny is the demo from scratch: leave it out to fine-tune --init with LIMA's recipe")
if args.size not in (None, "tiny"):  # the README's layout
    args.init = args.init or f"llama/{args.size}"
if args.init and not Path(args.init).is_dir():
    fail(f"--init {args.init}: no such directory" + (
        f" (--size {args.size} fine-tunes llama/{args.size} unless --init names another)" * bool(args.size)))
fill(LIMA if args.init else TINY)  # batch size and dropout of a pretrained model: once its size is known
for ok, flag, want in [
        (args.epochs >= 1, "epochs", ">= 1"), (args.batch_size is None or args.batch_size >= 1, "batch_size",
                                                ">= 1"),
        (args.lr > 0, "lr", "> 0"), (0 <= (args.dropout or 0) < 1, "dropout", "in [0, 1)"),
        (args.max_len >= 2, "max_len", ">= 2"), (args.tokens_per_micro >= 1, "tokens_per_micro", ">= 1"),
        (args.dev_samples >= 0, "dev_samples", ">= 0")]:
    if not ok:
        fail(f"--{flag} {getattr(args, flag)}: expected {want}")
spec = f"1-{args.epochs}" if args.save_epochs == "all" else args.save_epochs
a, _, b = spec.partition("-")
try:  # the last epoch is always saved
    save_epochs = {args.epochs, *(range(int(a), int(b) + 1) if b else map(int, spec.split(",")))}
except ValueError:
    fail(f"--save_epochs {args.save_epochs!r}: expected 'all', a range like 5-10 or a list like 1,3,7")

# -----------------------------------------------------------------------------
# processes: torchrun sets RANK, WORLD_SIZE and LOCAL_RANK on every node; plain python is one process
distributed = "WORLD_SIZE" in os.environ
rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
master = rank == 0
device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
if device.type == "cuda":
    torch.cuda.set_device(device)
if distributed:  # 1 h, not NCCL's 10 min: the others wait while rank 0 alone reads 65B's 130 GB or saves
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=1),
                            device_id=device if device.type == "cuda" else None)  # NCCL binds to the GPU now
bf16 = (args.dtype or ("bfloat16" if device.type == "cuda" else "float32")) == "bfloat16"  # bf16 on a CPU is slow
autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
out = Path(args.out)
warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # DCP in one process: that is the intent


def check_out():  # a run owns its --out: a fresh run never writes over another's log, resume state or epochs
    if not args.resume and out.is_dir() and any(f.name in ("log.jsonl", "resume") or
                                                f.name.startswith("epoch_") for f in out.iterdir()):
        fail(f"--out {out} holds another run (log.jsonl, resume/, epoch_NN/): continue it with --resume, "
             f"or give a fresh --out")


check_out()  # now, and again under the lock before writing anything

# -----------------------------------------------------------------------------
# data: prepare.py's token ids and loss masks (true on the assistant's tokens and their EOT)
data = Path(args.data)
if not data.is_dir():
    fail(f"--data {data}: no such directory (make it with: python prepare.py --out {data})")
try:
    tokenizer = Tokenizer(data / "tokenizer.model")
    blobs = [(data / f"{split}.pt").read_bytes() for split in ("train", "dev")]
    train, dev = (torch.load(io.BytesIO(b), weights_only=True) for b in blobs)
    data_sha = hashlib.sha256(b"".join(blobs)).hexdigest()  # what a resumed run must train on again
    sha = hashlib.sha256((data / "tokenizer.model").read_bytes()).hexdigest()
except Exception as e:
    fail(f"--data {data}: cannot read tokenizer.model, train.pt and dev.pt ({e}); run prepare.py")
n_words = tokenizer.n_words
for split, d in (("train", train), ("dev", dev)):
    if (d.get("n_words"), d.get("eot_id"), d.get("tokenizer_sha256")) != (n_words, n_words - 1, sha) or \
            any(int(x.max()) >= n_words for x in d["ids"]):
        fail(f"{data / split}.pt was not tokenized with {data / 'tokenizer.model'} ({n_words} words, EOT {n_words - 1}); "
             f"rerun prepare.py")
    d["ids"], d["mask"] = [x[: args.max_len] for x in d["ids"]], [m[: args.max_len] for m in d["mask"]]
# a dialogue trimmed before its first answer has nothing to train on (and a batch of only those would divide by 0)
keep = [i for i, m in enumerate(train["mask"]) if m[1:].any()]
if master and len(keep) < len(train["ids"]):
    print(f"warning: {len(train['ids']) - len(keep)} dialogues have no answer token within --max_len {args.max_len}; "
          f"skipping them", file=sys.stderr)
train = {**train, **{k: [train[k][i] for i in keep] for k in ("ids", "mask", "conversations")}}
if not train["ids"]:
    fail(f"{data / 'train.pt'}: no dialogue with an answer token within --max_len {args.max_len}")

# -----------------------------------------------------------------------------
# model: the starting weights exist whole only on rank 0 (memory-mapped for a LLaMA); the others get them by broadcast
src = None
if master and args.init:
    tok = next((t for t in (Path(args.init) / "tokenizer.model", Path(args.init).parent / "tokenizer.model")
                if t.is_file()), None)  # LLaMA's, beside the weights or one level up
    if tok and hashlib.sha256(tok.read_bytes()).hexdigest() != sha:
        fail(f"{tok} differs from {data / 'tokenizer.model'}: prepare the data with the checkpoint's tokenizer")
    try:
        src = Transformer.from_pretrained(args.init, vocab_size=n_words)  # LIMA §2: adds EOT
    except (CheckpointError, FileNotFoundError) as e:
        fail(str(e))
elif master:
    overrides = {k: getattr(args, k) for k in ("dim", "n_layers", "n_heads") if getattr(args, k)}
    torch.manual_seed(args.seed)
    src = Transformer(ModelArgs.from_size("tiny", vocab_size=n_words, max_seq_len=args.max_len,
                                          dropout=args.dropout, **overrides))
model_args = [src.args if master else None]
if distributed:
    dist.broadcast_object_list(model_args, src=0)
shape = model_args[0]
if args.init:  # LIMA's recipe for any base model: its parameter count picks the batch size and dropout
    count = sum(math.prod(s) for s in expected_shapes(shape).values())
    fill(SMALLER if count < 10e9 else LARGER)
    preset = f"LIMA's for {'smaller models (under' if count < 10e9 else 'larger models (over'} 10B " \
             f"parameters): {args.init} has {count / 1e9:.2f}B"
    llama = ModelArgs.from_size(args.size) if args.size else shape
    if (shape.dim, shape.n_layers, shape.n_heads) != (llama.dim, llama.n_layers, llama.n_heads):
        fail(f"--size {args.size}: {args.init} is not LLaMA-1 {args.size} (dim {shape.dim}, {shape.n_layers} "
             f"layers, {shape.n_heads} heads, {count / 1e9:.2f}B parameters); leave out --size to fine-tune "
             f"it as it is")
else:
    preset = "the tiny demo's, from scratch (not LIMA's: far larger steps, for a CPU)"
shape.dropout = args.dropout
# what the resume state depends on (world size and micro-batching change nothing: see the loss below)
run = {k: vars(args)[k] for k in ("epochs", "batch_size", "lr", "min_lr", "weight_decay", "beta1", "beta2",
                                  "seed", "max_len", "dropout")}
run = json.loads(json.dumps({**run, "data": data_sha, "model": asdict(shape)}))  # as run.json reads back
if args.resume:
    saved = sorted((out / "resume").glob("step_*"))
    if not saved:
        fail(f"--resume: nothing saved in {out / 'resume'}")
    try:
        was = json.loads((saved[-1] / "run.json").read_text())
        bad = next((k for k in run if was[k] != run[k]), None)
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        fail(f"--resume: {saved[-1]} is not a resume state written by this train.py ({e!r})")
    if bad:
        fail(f"--resume: {saved[-1]} was trained with " + (
            f"other data than --data {data} (its train.pt and dev.pt differ)" if bad == "data" else
            "another model: " + ", ".join(f"{k} {v}, not {run[bad].get(k)}" for k, v in was[bad].items()
                                          if v != run[bad].get(k)) if bad == "model" else
            f"--{bad} {was[bad]}, not {run[bad]}") + "; resume with the same settings, or give a fresh --out")
with torch.device("meta"):
    model = Transformer(model_args[0])
if args.act_ckpt:  # keep only each block's input; recompute the rest in the backward pass
    for block in model.layers:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
if distributed:  # one unit per block: bf16 gathers and matmuls, fp32 gradient reductions; inputs not cast:
    # RoPE's tables stay float32 as in sample.py (the hidden state is bf16 from the embedding on)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32,
                              cast_forward_inputs=False)
    for block in model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
model.to_empty(device=device)  # float32: the master weights
set_model_state_dict(model, src.state_dict() if master else {},
                     options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=distributed))
del src

# AdamW; weight decay on matrices and embeddings, not on the norms' gains. Fused on CUDA, since the default
# (foreach) allocates a float32 temporary the size of the local shard in step(): 16 GB a GPU, 65B on 16 GPUs
params = [q for q in model.parameters() if q.requires_grad]
optimizer = torch.optim.AdamW([{"params": [q for q in params if q.dim() >= 2], "weight_decay": args.weight_decay},
                               {"params": [q for q in params if q.dim() < 2], "weight_decay": 0.0}],
                              lr=args.lr, betas=(args.beta1, args.beta2), fused=device.type == "cuda")
steps_per_epoch = math.ceil(len(train["ids"]) / args.batch_size)
total_steps = args.epochs * steps_per_epoch


# -----------------------------------------------------------------------------
def plan(d, idx):
    """This rank's micro-batches of the dialogues idx: longest first, cut at tokens_per_micro (padding included) so
    each holds similar lengths, dealt round-robin; every rank gets as many (FSDP gathers collectively), [] if idle."""
    idx, micros = sorted(idx, key=lambda i: -len(d["ids"][i])), [[]]
    for i in idx:
        if micros[-1] and (len(micros[-1]) + 1) * len(d["ids"][micros[-1][0]]) > args.tokens_per_micro:
            micros.append([])
        micros[-1].append(i)
    mine = micros[rank::world]
    return mine + [[]] * (math.ceil(len(micros) / world) - len(mine))


def micro_loss(d, micro):
    """Summed cross-entropy of the supervised next tokens of one right-padded micro-batch (causal attention: the
    padding after a dialogue never affects it) and the number of padded positions."""
    T = max((len(d["ids"][i]) - 1 for i in micro), default=1)
    x = torch.zeros(max(1, len(micro)), T, dtype=torch.long)
    y = torch.full_like(x, -1)  # -1: not a training target (prompt, padding)
    for r, i in enumerate(micro):
        ids, mask = d["ids"][i], d["mask"][i]
        x[r, : len(ids) - 1], y[r, : len(ids) - 1] = ids[:-1], torch.where(mask[1:], ids[1:], -1)
    with autocast:
        logits = model(x.to(device))
    loss = F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), ignore_index=-1, reduction="sum")
    return loss, x.numel() - sum(len(d["ids"][i]) - 1 for i in micro) if micro else 0


def all_sum(*values):
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if distributed:
        dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate():
    model.eval()
    loss = all_sum(sum(micro_loss(dev, m)[0].item() for m in plan(dev, range(len(dev["ids"])))))[0]
    n = sum(int(m[1:].sum()) for m in dev["mask"])
    model.train()
    return loss / n if n else None


@torch.no_grad()
def save_epoch(epoch, dev_loss):
    """OUT/epoch_NN/, a Hugging Face LLaMA directory (transformers, vLLM, llama.cpp's converter and sample.py
    load it), with LIMA-sampled answers to the dev prompts: what LIMA chose its checkpoint from (§3)."""
    model.eval()
    n = min(args.dev_samples, len(dev["ids"]))
    convs = dev["conversations"][rank:n:world]  # each rank answers its share of the prompts
    prompts = [tokenizer.encode_dialogue(c[:1])[0] for c in convs]
    answers = [[] for _ in prompts]
    if prompts:  # a bf16 cache under bf16 compute: 65B's float32 cache would take 5 MB a token
        length = min(model.args.max_seq_len, max(map(len, prompts)) + args.max_new_tokens)
        model.setup_cache(len(prompts), length, dtype=torch.bfloat16 if bf16 else None)
    g = torch.Generator(device).manual_seed(args.seed + epoch * world + rank)
    eot = tokenizer.eot_id
    steps = generate(model, prompts, eot, args.max_new_tokens, generator=g) if prompts else iter(())
    with autocast:
        while True:  # one forward per rank per turn, in lockstep: FSDP gathers each block's weights collectively
            nxt = next(steps, None)  # runs a forward unless this rank's answers are complete
            if nxt is None:
                model(torch.zeros(1, 1, dtype=torch.long, device=device))  # join the others' gathers
            else:
                for a, t in zip(answers, nxt.tolist()):
                    a += [t] if t >= 0 else []  # -1: that answer has ended
            if all_sum(nxt is not None)[0] == 0:
                break
    model.clear_cache()
    rows = [{"prompt": c[0], "response": tokenizer.decode(a[: a.index(eot)] if eot in a else a), "ended": eot in a}
            for c, a in zip(convs, answers)]
    if distributed:  # back in prompt order on rank 0: prompt k was rank k % world's (k // world)-th
        shares = [None] * world if master else None
        dist.gather_object(rows, shares, dst=0)
        rows = [shares[k % world][k // world] for k in range(n)] if master else rows
    model.train()
    # the weights in bf16 with Hugging Face's names and q/k order, in safetensors files of <= 5 GB. Each rank
    # writes its own rows of every weight (FSDP2 shards dim 0 as torch.chunk does) where they go in the files:
    # no rank holds more than its shard and one q/k matrix, gathered as HF's order moves rows across shards
    tmp, final, old = (out / f"{pre}epoch_{epoch:02d}" for pre in (".tmp_", "", ".old_"))
    state, headers, where = model.state_dict(), [{}], {}  # where: weight -> (file number, offset in its data)
    for k, v in state.items():
        at = max((h["data_offsets"][1] for h in headers[-1].values()), default=0)
        if at and at + 2 * v.numel() > 5e9:
            headers, at = headers + [{}], 0
        where[k] = len(headers) - 1, at
        headers[-1][_hf_name(k, to_hf=True)] = dict(dtype="BF16", shape=list(v.shape),
                                                   data_offsets=[at, at + 2 * v.numel()])
    files = [tmp / f"model-{i + 1:05d}-of-{len(headers):05d}.safetensors" for i in range(len(headers))]
    headers = [json.dumps({**h, "__metadata__": {"format": "pt"}}).encode() for h in headers]
    headers = [h + b" " * (-len(h) % 8) for h in headers]  # the data starts 8-byte aligned
    if master:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for file, h in zip(files, headers):
            file.write_bytes(len(h).to_bytes(8, "little") + h)
    if distributed:
        dist.barrier()  # the files exist
    handles = [open(file, "r+b") for file in files]
    for k, v in state.items():
        v = v.to(torch.bfloat16)  # this rank's part only, if sharded
        if k.endswith(("wq.weight", "wk.weight")):
            v = v.full_tensor() if isinstance(v, DTensor) else v
            v = hf_rotary_order(v, model.args.dim // model.args.n_heads, to_hf=True)
        chunk, (i, at) = math.ceil(v.shape[0] / world), where[k]
        mine = v.to_local() if isinstance(v, DTensor) else v[rank * chunk : (rank + 1) * chunk]
        handles[i].seek(8 + len(headers[i]) + at + rank * chunk * 2 * math.prod(v.shape[1:]))
        handles[i].write(mine.cpu().contiguous().view(torch.uint8).numpy())
    for f in handles:
        f.flush()
        os.fsync(f.fileno())
        f.close()
    if distributed:
        dist.barrier()  # every rank's rows are on disk
    if not master:
        return
    index = {"metadata": {"total_size": 2 * sum(v.numel() for v in state.values())},
             "weight_map": {_hf_name(k, to_hf=True): files[where[k][0]].name for k in state}}
    for name, obj in {**hf_files(model.args, tokenizer), "model.safetensors.index.json": index}.items():
        (tmp / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False))
    shutil.copy(data / "tokenizer.model", tmp / "tokenizer.model")
    (tmp / "samples.jsonl").write_text("".join(json.dumps({"epoch": epoch, "dev_loss": dev_loss, **r}) + "\n" for r in rows))
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():  # replaced in two renames: a kill between them leaves the old epoch whole, under .old_
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


class Unpickler(pickle.Unpickler):  # DCP's metadata is a pickle: let it build DCP's records, torch types only
    def find_class(self, module, name):
        if (module == dcp_metadata.__name__ and name in (*dcp_metadata.__all__, "_MEM_FORMAT_ENCODING")) or \
                (module, name) in {("torch", "Size"), ("torch.serialization", "_get_layout"),
                                   ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                                   ("pathlib", "PosixPath")} or \
                (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} has no place in a checkpoint's metadata")


class Reader(dcp.FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        with open(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
            metadata = Unpickler(f).load()
        # only tensors are read back: DCP would unpickle an entry stored as "bytes" with plain pickle
        metadata.state_dict_metadata = {k: v for k, v in metadata.state_dict_metadata.items()
                                        if not isinstance(v, dcp_metadata.BytesStorageMetadata)}
        return metadata


if master:  # rank 0 holds OUT/.lock while the run lives: a second train.py into this --out is refused
    out.mkdir(parents=True, exist_ok=True)
    lock = open(out / ".lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fail(f"--out {out}: another train.py is writing there (it holds {out / '.lock'}); wait for it or "
             f"give another --out")
    check_out()
start = 0
if args.resume:  # data order, dropout masks and lr are functions of the step: weights and AdamW state are all we need
    model_state, optim_state = get_state_dict(model, optimizer)
    logging.disable(logging.WARNING)  # DCP logs a failed read's traceback, then raises: one line says it
    try:  # tensors only: the param groups (pickled, "bytes") are what the flags give
        dcp.load({"model": model_state, "optim": {"state": optim_state["state"]}},
                 storage_reader=Reader(saved[-1]))
    except (Exception, CheckpointException) as e:  # damaged, foreign or hostile
        e = next(iter(e.failures.values()))[0] if isinstance(e, CheckpointException) else e
        fail(f"--resume: {saved[-1]} cannot be loaded ({e!r})")
    logging.disable(logging.NOTSET)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    start = int(saved[-1].name[5:])
if master:  # OUT/log.jsonl: one JSON object a line, the settings first with LIMA's defaults filled in
    print(f"recipe: {preset}; {args.epochs} epochs, batch {args.batch_size}, lr {args.lr:g} to "
          f"{args.min_lr:g}, dropout {args.dropout}", file=sys.stderr)
    logf = open(out / "log.jsonl", "a" if args.resume else "w", buffering=1)
    print(json.dumps({"config": vars(args), "preset": preset, "world_size": world,
                      "compute_dtype": "bfloat16" if bf16 else "float32"}), file=logf)

# -----------------------------------------------------------------------------
end = min(total_steps, args.steps or total_steps)
# MFU per token: 6 FLOPs a matmul weight + 12 * layers * dim * T in attention over T tokens (PaLM, app. B)
n_matmul = sum(q.numel() for q in params) - model.tok_embeddings.weight.numel()  # a lookup, not a matmul
gpu = torch.cuda.get_device_name() if device.type == "cuda" else ""  # H100 SXM, PCIe, NVL differ; A100s don't
peak = args.peak_flops or {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12,
                           "NVIDIA H100 NVL": 835e12, "NVIDIA H200": 989e12, "NVIDIA H200 NVL": 835e12,
                           }.get(gpu, 312e12 if "A100" in gpu else None)
bar = tqdm(range(start, end), initial=start, total=total_steps, disable=not master,
           desc="train (LIMA's recipe)" if args.init else "train (tiny demo)")
diverged = lambda what: fail(f"non-finite {what} at step {step + 1} (epoch {epoch + 1}); stopped before "
                             f"saving it: everything in {out} is from before it")  # checked before any save
model.train()
for step in bar:
    t0 = time.time()
    epoch, k = divmod(step, steps_per_epoch)
    order = torch.randperm(len(train["ids"]), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
    batch = order[k * args.batch_size : (k + 1) * args.batch_size]
    lr = args.lr + (args.min_lr - args.lr) * step / max(1, total_steps - 1)  # LIMA §3: no warmup, linear to min_lr
    for group in optimizer.param_groups:
        group["lr"] = lr
    # the loss is summed over supervised tokens and divided by their count in the whole global batch, so the update
    # does not depend on world size or micro-batching; x world because FSDP averages gradients over ranks
    n_target = sum(int(train["mask"][i][1:].sum()) for i in batch)
    torch.manual_seed(args.seed + step * world + rank)  # dropout masks: a resumed run draws the same
    micros, loss_sum, pad = plan(train, batch), torch.zeros((), device=device), 0
    for micro in micros:  # FSDP reduce-scatters each micro-batch's gradients: they stay sharded
        loss, padded = micro_loss(train, micro)
        (loss * world / n_target).backward()
        loss_sum, pad = loss_sum + loss.detach(), pad + padded  # no host sync per micro-batch
    loss_sum, pad = all_sum(loss_sum.item(), pad)
    if not math.isfinite(loss_sum):
        diverged("loss")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    lengths = [len(train["ids"][i]) - 1 for i in batch]
    tokens, seconds = sum(lengths), time.time() - t0
    log = dict(step=step + 1, epoch=epoch + 1, loss=loss_sum / n_target, lr=lr, tokens=tokens,
               pad=pad / (pad + tokens), tokens_per_s=round(tokens / seconds))
    if peak:
        flops = sum(6 * n_matmul * t + 12 * model.args.n_layers * model.args.dim * t * t for t in lengths)
        log["mfu"] = flops / (seconds * peak * world)
    if master:
        bar.set_postfix(loss=f"{log['loss']:.3f}", lr=f"{log['lr']:.1e}", tok_s=log["tokens_per_s"],
                        **({"mfu": f"{log['mfu']:.0%}"} if peak else {}))
        print(json.dumps(log), file=logf)
    saving = k == steps_per_epoch - 1 or step + 1 == end
    if saving and all_sum(torch.stack([~torch.isfinite(q.to_local() if hasattr(q, "to_local") else q).all()
                                       for q in params]).any().item())[0]:
        diverged("weights")
    if k == steps_per_epoch - 1:  # end of an epoch
        dev_loss = evaluate()
        if dev_loss is not None and not math.isfinite(dev_loss):
            diverged("dev loss")
        if master:
            tqdm.write(f"epoch {epoch + 1}: dev loss {dev_loss}")
            print(json.dumps({"epoch": epoch + 1, "dev_loss": dev_loss}), file=logf)
        if epoch + 1 in save_epochs:
            save_epoch(epoch + 1, dev_loss)
    if saving:  # weights, AdamW state and step; each rank writes its shards
        model_state, optim_state = get_state_dict(model, optimizer)
        tmp, final = out / "resume" / f".tmp_step_{step + 1:06d}", out / "resume" / f"step_{step + 1:06d}"
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)
        if master:  # a new step number: one atomic rename puts it in place, then the older states go
            (tmp / "run.json").write_text(json.dumps(run))
            tmp.rename(final)
            for old in (out / "resume").iterdir():
                if old != final:
                    shutil.rmtree(old)
bar.close()
if distributed:
    dist.destroy_process_group()
