"""
Fine-tune LLaMA on LIMA's dialogues with the plain next-token loss (Zhou et al., 2023, §3).

    python train.py                                                  # the CPU demo: a tiny model from scratch
    torchrun --nproc_per_node 8 train.py --size 7B --data data/lima              # LLaMA-1 7B from llama/7B
    torchrun --nproc_per_node 8 train.py --init TinyLlama-1.1B --data data/lima  # any LLaMA-family model

Master weights and AdamW state stay in float32 (LIMA's 1e-6 updates vanish in bf16 weights); on CUDA the
arithmetic runs in bf16. Under torchrun FSDP2 shards weights, gradients and AdamW state, one unit per block.
"""
import argparse, fcntl, functools, hashlib, json, logging, math, os, pickle, shutil, sys, time, warnings
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

from model import (CheckpointError, ModelArgs, Tokenizer, Transformer, _hf_name, generate, hf_files,
                   hf_rotary_order)

# LIMA §3's recipe for a pretrained model: batch 64 and dropout 0.2 for "smaller models" (the paper names 7B;
# here: under 10B parameters), 32 and 0.3 above; dev answers are a 128-token preview (README: LIMA's 2,048
# cost hours at 65B). The tiny demo learns from scratch on a CPU in minutes: far larger steps
LIMA = dict(epochs=15, lr=1e-5, min_lr=1e-6, act_ckpt=1, max_new_tokens=128)
TINY = dict(epochs=10, lr=3e-3, min_lr=3e-4, batch_size=4, dropout=0.0, act_ckpt=0, max_new_tokens=256)
SMALLER, LARGER = dict(batch_size=64, dropout=0.2), dict(batch_size=32, dropout=0.3)
p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
p.add_argument("--size", help="LLaMA-1's 7B, 13B, 33B (30B) or 65B: llama/SIZE unless --init; tiny: the demo")
p.add_argument("--init", help="a pretrained LLaMA-family directory (Meta or Hugging Face), any size")
p.add_argument("--data", default="data/prepared", help="prepare.py's output")
p.add_argument("--out", default="out")
for flag, tiny in TINY.items():  # left out: the recipe's, filled in below
    lima = LIMA[flag] if flag in LIMA else f"{SMALLER[flag]} under 10B parameters, {LARGER[flag]} above"
    p.add_argument(f"--{flag}", type=type(tiny), help=f"with --init: {lima}; the tiny demo: {tiny}")
for flag, default in dict(weight_decay=0.1, beta1=0.9, beta2=0.95, seed=1337).items():  # AdamW's: LIMA §3
    p.add_argument(f"--{flag}", type=type(default), default=default)
p.add_argument("--max_len", type=int, default=2048, help="trim dialogues to this many tokens")
p.add_argument("--tokens_per_micro", type=int, default=2048, help="tokens per forward pass, padding included")
p.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype; default: bfloat16 on CUDA")
p.add_argument("--dev_samples", type=int, default=50, help="dev prompts answered at each saved epoch")
p.add_argument("--save_epochs", default="5-10", help='"5-10" (LIMA\'s choice), "all" or "1,3,7"; last always')
p.add_argument("--resume", action="store_true", help="continue from OUT/resume/")
p.add_argument("--peak_flops", type=float, help="a GPU's dense bf16 FLOP/s for the MFU; default: known GPUs'")
p.add_argument("--steps", type=int, help="stop (resumably) after this many optimizer steps in total")
for flag in ("dim", "n_layers", "n_heads"):
    p.add_argument(f"--{flag}", type=int, help="tiny only: the model's shape")
args = p.parse_args()
fail = lambda msg: sys.exit(f"error: {msg}")  # one line, no traceback
fill = lambda preset: vars(args).update({k: v for k, v in preset.items() if vars(args)[k] is None})
if args.size not in (None, "tiny", "7B", "13B", "30B", "33B", "65B"):
    fail(f"--size {args.size}: expected 7B, 13B, 33B (or 30B), 65B or tiny; another base model: --init DIR")
if args.size == "tiny" and args.init:
    fail("--size tiny is the demo from scratch: leave it out to fine-tune --init with LIMA's recipe")
if args.size not in (None, "tiny") and not args.init:
    args.init = f"llama/{args.size}"  # the README's layout
if args.init and not Path(args.init).is_dir():
    fail(f"--init {args.init}: no such directory" + (
        f" (--size {args.size} fine-tunes llama/{args.size} unless --init names another)" * bool(args.size)))
fill(LIMA if args.init else TINY)  # batch size and dropout of a pretrained model: once its size is known
for flag, ok, want in [("epochs", args.epochs >= 1, ">= 1"), ("act_ckpt", args.act_ckpt in (0, 1), "0 or 1"),
                       ("batch_size", args.batch_size is None or args.batch_size >= 1, ">= 1"),
                       ("lr", args.lr > 0, "> 0"), ("tokens_per_micro", args.tokens_per_micro >= 1, ">= 1"),
                       ("max_len", args.max_len >= 2, ">= 2"), ("dev_samples", args.dev_samples >= 0, ">= 0"),
                       ("dropout", 0 <= (args.dropout or 0) < 1, "in [0, 1)")]:
    if not ok:
        fail(f"--{flag} {vars(args)[flag]}: expected {want}")
try:  # the last epoch is always saved
    a, _, b = (f"1-{args.epochs}" if args.save_epochs == "all" else args.save_epochs).partition("-")
    save_epochs = {args.epochs, *(range(int(a), int(b) + 1) if b else map(int, a.split(",")))}
except ValueError:
    fail(f"--save_epochs {args.save_epochs!r}: expected 'all', a range like 5-10 or a list like 1,3,7")

# -----------------------------------------------------------------------------
# processes: torchrun sets RANK, WORLD_SIZE and LOCAL_RANK on every node; plain python is one process
distributed = "WORLD_SIZE" in os.environ
rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
master = rank == 0
device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
cuda = device.type == "cuda"
if cuda:
    torch.cuda.set_device(device)
if distributed:  # 1 h, not NCCL's 10 min: the others wait while rank 0 alone reads 65B's 130 GB or saves
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=1),
                            device_id=device if cuda else None)  # NCCL binds to the GPU now
bf16 = (args.dtype or ("bfloat16" if cuda else "float32")) == "bfloat16"  # bf16 on a CPU is slow
autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
out = Path(args.out)
warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # DCP in one process: the intent


def check_out():  # a run owns its --out: a fresh run never writes over another's log, resume state or epochs
    if not args.resume and any(any(out.glob(name)) for name in ("log.jsonl", "resume", "epoch_*")):
        fail(f"--out {out} holds another run (log.jsonl, resume/, epoch_NN/): continue it with --resume, "
             "or give a fresh --out")


check_out()  # now, and again under the lock before writing anything

# -----------------------------------------------------------------------------
# data: prepare.py's token ids and loss masks (true on the assistant's tokens and their EOT)
data = Path(args.data)
if not data.is_dir():
    fail(f"--data {data}: no such directory (make it with: python prepare.py --out {data})")
sha256 = lambda *files: hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()
try:
    tokenizer, sha = Tokenizer(data / "tokenizer.model"), sha256(data / "tokenizer.model")
    train, dev = (torch.load(data / f"{split}.pt", weights_only=True) for split in ("train", "dev"))
    data_sha = sha256(data / "train.pt", data / "dev.pt")  # what a resumed run must train on again
except Exception as e:
    fail(f"--data {data}: cannot read tokenizer.model, train.pt and dev.pt ({e}); run prepare.py")
n_words = tokenizer.n_words
for split, d in (("train", train), ("dev", dev)):
    if [d.get(k) for k in ("n_words", "eot_id", "tokenizer_sha256")] != [n_words, n_words - 1, sha] or \
            any(int(x.max()) >= n_words for x in d["ids"]):
        fail(f"{data / split}.pt was not tokenized with {data / 'tokenizer.model'} ({n_words} words, EOT "
             f"{n_words - 1}); rerun prepare.py")
    d["ids"], d["mask"] = [x[: args.max_len] for x in d["ids"]], [m[: args.max_len] for m in d["mask"]]
# a dialogue trimmed before its first answer has nothing to train on (a batch of only those would divide by 0)
keep = [i for i, m in enumerate(train["mask"]) if m[1:].any()]
if master and len(keep) < len(train["ids"]):
    print(f"warning: {len(train['ids']) - len(keep)} dialogues have no answer token within --max_len "
          f"{args.max_len}; skipping them", file=sys.stderr)
if not keep:
    fail(f"{data / 'train.pt'}: no dialogue with an answer token within --max_len {args.max_len}")
train = {**train, **{k: [train[k][i] for i in keep] for k in ("ids", "mask", "conversations")}}

# -----------------------------------------------------------------------------
# model: the starting weights exist whole only on rank 0 (memory-mapped for a LLaMA), the others get them by
# broadcast; LLaMA's tokenizer.model lies beside the weights or one level up
if master and args.init:
    tok = next((t for t in (Path(args.init) / "tokenizer.model", Path(args.init).parent / "tokenizer.model")
                if t.is_file()), None)
    if tok and sha256(tok) != sha:
        fail(f"{tok} differs from {data / 'tokenizer.model'}: prepare the data with it")
    try:
        src = Transformer.from_pretrained(args.init, vocab_size=n_words)  # LIMA §2: adds EOT
    except (CheckpointError, FileNotFoundError) as e:
        fail(str(e))
elif master:
    torch.manual_seed(args.seed)
    src = Transformer(ModelArgs.from_size("tiny", vocab_size=n_words, max_seq_len=args.max_len, **{
        k: vars(args)[k] for k in ("dim", "n_layers", "n_heads") if vars(args)[k]}))
shape = [(src.args, sum(q.numel() for q in src.parameters())) if master else None]
if distributed:
    dist.broadcast_object_list(shape, src=0)
shape, count = shape[0]
if args.init:  # LIMA's recipe for any base model: its parameter count picks the batch size and dropout
    fill(SMALLER if count < 10e9 else LARGER)
    preset = f"LIMA's for {'smaller models (under' if count < 10e9 else 'larger models (over'} 10B " \
             f"parameters): {args.init} has {count / 1e9:.2f}B"
    llama = ModelArgs.from_size(args.size) if args.size else shape
    if (shape.dim, shape.n_layers, shape.n_heads) != (llama.dim, llama.n_layers, llama.n_heads):
        fail(f"--size {args.size}: {args.init} is not LLaMA-1 {args.size} (dim {shape.dim}, {shape.n_layers} "
             f"layers, {shape.n_heads} heads, {count / 1e9:.2f}B parameters); leave out --size to fine-tune "
             "it as it is")
else:
    preset = "the tiny demo's, from scratch (not LIMA's: far larger steps, for a CPU)"
shape.dropout = args.dropout
# what the resume state depends on (world size and micro-batching change nothing: see the loss below)
run = {k: vars(args)[k] for k in ("epochs", "batch_size", "lr", "min_lr", "weight_decay", "beta1", "beta2",
                                  "seed", "max_len", "dropout")}
run = json.loads(json.dumps({**run, "data": data_sha, "model": vars(shape)}))  # as run.json reads back
if args.resume:
    last = max((out / "resume").glob("step_*"), default=None)
    if not last:
        fail(f"--resume: nothing saved in {out / 'resume'}")
    try:
        was = json.loads((last / "run.json").read_text())
        bad = next((k for k in run if was[k] != run[k]), None)
        model_diff = ", ".join(f"{k} {v}, not {run['model'].get(k)}" for k, v in was["model"].items()
                               if v != run["model"].get(k))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        fail(f"--resume: {last} is not a resume state written by this train.py ({e!r})")
    if bad:
        why = {"data": f"other data than --data {data} (its train.pt and dev.pt differ)",
               "model": f"another model: {model_diff}"}.get(bad, f"--{bad} {was[bad]}, not {run[bad]}")
        fail(f"--resume: {last} was trained with {why}; resume with the same settings, or give a fresh --out")
with torch.device("meta"):
    model = Transformer(shape)
if args.act_ckpt:  # keep only each block's input; recompute the rest in the backward pass
    for block in model.layers:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
if distributed:  # one unit per block: bf16 gathers and matmuls, fp32 gradient reductions; inputs not cast:
    # RoPE's tables stay float32 as in sample.py (the hidden state is bf16 from the embedding on)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32,
                              cast_forward_inputs=False)
    for unit in [*model.layers, model]:
        fully_shard(unit, mp_policy=mp)
model.to_empty(device=device)  # float32: the master weights
set_model_state_dict(model, src.state_dict() if master else {},
                     options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=distributed))
src = None

# AdamW; weight decay on matrices and embeddings, not on the norms' gains. Fused on CUDA, since the default
# (foreach) allocates a float32 temporary the size of the local shard in step(): 16 GB a GPU, 65B on 16 GPUs
params = list(model.parameters())
groups = [{"params": [q for q in params if q.dim() >= 2], "weight_decay": args.weight_decay},
          {"params": [q for q in params if q.dim() < 2], "weight_decay": 0.0}]
optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), fused=cuda)
steps_per_epoch = math.ceil(len(train["ids"]) / args.batch_size)
total_steps = args.epochs * steps_per_epoch


# -----------------------------------------------------------------------------
def micro_losses(d, idx):
    """This rank's micro-batches of the dialogues idx, right-padded (causal attention keeps the padding out of
    the loss): longest first, cut at tokens_per_micro padding included so each holds similar lengths, dealt
    round-robin, as many on every rank (FSDP gathers collectively). Yields (summed loss, padded positions)."""
    micros = [[]]
    for i in sorted(idx, key=lambda i: -len(d["ids"][i])):
        if micros[-1] and (len(micros[-1]) + 1) * len(d["ids"][micros[-1][0]]) > args.tokens_per_micro:
            micros.append([])
        micros[-1].append(i)
    mine = micros[rank::world]
    for micro in mine + [[]] * (math.ceil(len(micros) / world) - len(mine)):  # [] for an idle rank
        T = max((len(d["ids"][i]) - 1 for i in micro), default=1)
        x = torch.zeros(max(1, len(micro)), T, dtype=torch.long)
        y = torch.full_like(x, -1)  # -1: not a training target (prompt, padding)
        for r, i in enumerate(micro):
            ids, mask = d["ids"][i], d["mask"][i]
            x[r, : len(ids) - 1], y[r, : len(ids) - 1] = ids[:-1], torch.where(mask[1:], ids[1:], -1)
        with autocast:  # the logits unnamed: this suspended generator would hold them through the backward
            loss = F.cross_entropy(model(x.to(device)).float().flatten(0, 1), y.to(device).flatten(),
                                   ignore_index=-1, reduction="sum")
        yield loss, x.numel() - sum(len(d["ids"][i]) - 1 for i in micro) if micro else 0


def all_sum(*values):
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if distributed:
        dist.all_reduce(t)
    return t.tolist()


def save_epoch(epoch, dev_loss):
    """OUT/epoch_NN/, a Hugging Face LLaMA directory (transformers, vLLM, llama.cpp's converter and sample.py
    load it), with LIMA-sampled answers to the dev prompts: what LIMA chose its checkpoint from (§3)."""
    n = min(args.dev_samples, len(dev["ids"]))
    convs = dev["conversations"][rank:n:world]  # each rank answers its share of the prompts
    prompts = [tokenizer.encode_dialogue(c[:1])[0] for c in convs]
    answers, eot, steps, cache = [[] for _ in prompts], tokenizer.eot_id, iter(()), None
    if prompts:  # a bf16 cache under bf16 compute: 65B's float32 cache would take 5 MB a token
        length = min(shape.max_seq_len, max(map(len, prompts)) + args.max_new_tokens)
        cache = model.make_cache(len(prompts), length, dtype=torch.bfloat16 if bf16 else None)
        g = torch.Generator(device).manual_seed(args.seed + epoch * world + rank)
        steps = generate(model, prompts, eot, args.max_new_tokens, generator=g, cache=cache)
    with autocast:
        while True:  # one forward per rank per turn, in lockstep: FSDP gathers each block's weights together
            nxt = next(steps, None)  # runs a forward unless this rank's answers are complete
            if nxt is None:
                model(torch.zeros(1, 1, dtype=torch.long, device=device))  # join the others' gathers
            else:
                for a, t in zip(answers, nxt.tolist()):
                    a += [t] if t >= 0 else []  # -1: that answer has ended
            if all_sum(nxt is not None)[0] == 0:
                break
    steps = cache = None  # freed before the weights are written
    rows = [{"epoch": epoch, "dev_loss": dev_loss, "prompt": c[0], "response": tokenizer.decode(
        a[: a.index(eot)] if eot in a else a), "ended": eot in a} for c, a in zip(convs, answers)]
    shares = [rows] * world
    if distributed:  # back in prompt order: prompt k was rank k % world's (k // world)-th
        dist.all_gather_object(shares, rows)
    rows = [shares[k % world][k // world] for k in range(n)]
    # the weights in bf16 with Hugging Face's names and q/k order, in safetensors files of <= 5 GB. Each rank
    # writes its own rows of every weight (FSDP2 shards dim 0 as torch.chunk does) where they go in the files:
    # no rank holds more than its shard and one q/k matrix, gathered as HF's order moves rows across shards
    tmp, final, old = (out / f"{pre}epoch_{epoch:02d}" for pre in (".tmp_", "", ".old_"))
    state = {_hf_name(k, to_hf=True): v for k, v in model.state_dict().items()}
    files, at = [{}], 0  # per file: each weight's safetensors header entry
    for k, v in state.items():
        if at and at + 2 * v.numel() > 5e9:
            files, at = files + [{}], 0
        files[-1][k] = dict(dtype="BF16", shape=[*v.shape], data_offsets=[at, at + 2 * v.numel()])
        at += 2 * v.numel()
    files = {f"model-{i + 1:05d}-of-{len(files):05d}.safetensors": e for i, e in enumerate(files)}
    if master:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    for name, entries in files.items():
        header = json.dumps({**entries, "__metadata__": {"format": "pt"}}).encode()
        header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned
        if master:
            (tmp / name).write_bytes(len(header).to_bytes(8, "little") + header)
        if distributed:
            dist.barrier()  # the file exists
        with open(tmp / name, "r+b") as f:
            for k, e in entries.items():
                v = state[k].to(torch.bfloat16)  # this rank's part only, if sharded
                if k.endswith(("q_proj.weight", "k_proj.weight")):
                    v = v.full_tensor() if isinstance(v, DTensor) else v
                    v = hf_rotary_order(v, shape.dim // shape.n_heads, to_hf=True)
                chunk = math.ceil(v.shape[0] / world)
                mine = v.to_local() if isinstance(v, DTensor) else v[rank * chunk : (rank + 1) * chunk]
                f.seek(8 + len(header) + e["data_offsets"][0] + rank * chunk * 2 * math.prod(v.shape[1:]))
                f.write(mine.cpu().contiguous().view(torch.uint8).numpy())
            f.flush()
            os.fsync(f.fileno())
    if distributed:
        dist.barrier()  # every rank's rows are on disk
    if not master:
        return
    index = {"metadata": {"total_size": 2 * sum(v.numel() for v in state.values())},
             "weight_map": {k: name for name, entries in files.items() for k in entries}}
    for name, obj in {**hf_files(shape, tokenizer), "model.safetensors.index.json": index}.items():
        (tmp / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False))
    shutil.copy(data / "tokenizer.model", tmp / "tokenizer.model")
    (tmp / "samples.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():  # replaced in two renames: a kill between them leaves the old epoch whole, under .old_
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


class Unpickler(pickle.Unpickler):  # DCP's .metadata is a pickle: it may build DCP's records and torch types
    def find_class(self, module, name):
        if (module == dcp.metadata.__name__ and name in (*dcp.metadata.__all__, "_MEM_FORMAT_ENCODING")) or \
                f"{module}.{name}" in ("torch.Size", "torch.serialization._get_layout", "pathlib.PosixPath",
                                       "torch.distributed.checkpoint.filesystem._StorageInfo") or \
                (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} has no place in a checkpoint's metadata")


class Reader(dcp.FileSystemReader):  # tensors only: DCP would unpickle an entry stored as "bytes" with pickle
    def read_metadata(self, *args, **kwargs):
        with open(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
            metadata = Unpickler(f).load()
        metadata.state_dict_metadata = {k: v for k, v in metadata.state_dict_metadata.items()
                                        if not isinstance(v, dcp.metadata.BytesStorageMetadata)}
        return metadata


if master:  # rank 0 holds OUT/.lock while the run lives: a second train.py into this --out is refused
    out.mkdir(parents=True, exist_ok=True)
    lock = open(out / ".lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fail(f"--out {out}: another train.py is writing there (it holds {out / '.lock'}); wait for it or "
             "give another --out")
    check_out()
if args.resume:  # data order, dropout masks and lr are functions of the step: weights and AdamW state suffice
    model_state, optim_state = get_state_dict(model, optimizer)
    logging.disable(logging.WARNING)  # DCP logs a failed read's traceback, then raises: one line says it
    try:  # tensors only: the param groups (pickled, "bytes") are what the flags give
        dcp.load({"model": model_state, "optim": {"state": optim_state["state"]}},
                 storage_reader=Reader(last))
    except (Exception, dcp.CheckpointException) as e:  # damaged, foreign or hostile
        e = next(iter(e.failures.values()))[0] if isinstance(e, dcp.CheckpointException) else e
        fail(f"--resume: {last} cannot be loaded ({e!r})")
    logging.disable(logging.NOTSET)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
start = int(last.name[5:]) if args.resume else 0
if master:  # OUT/log.jsonl: one JSON object a line, the settings first with LIMA's defaults filled in
    print(f"recipe: {preset}; {args.epochs} epochs, batch {args.batch_size}, lr {args.lr:g} to "
          f"{args.min_lr:g}, dropout {args.dropout}", file=sys.stderr)
    logf = open(out / "log.jsonl", "a" if args.resume else "w", buffering=1)
    print(json.dumps({"config": vars(args), "preset": preset, "world_size": world,
                      "compute_dtype": "bfloat16" if bf16 else "float32"}), file=logf)

# -----------------------------------------------------------------------------
end = min(total_steps, args.steps or total_steps)
n_dev = sum(int(m[1:].sum()) for m in dev["mask"])  # supervised dev tokens
# MFU per token: 6 FLOPs a matmul weight + 12 * layers * dim * T in attention over T tokens (PaLM, app. B)
n_matmul = sum(q.numel() for q in params) - model.tok_embeddings.weight.numel()  # a lookup, not a matmul
gpu = torch.cuda.get_device_name().removeprefix("NVIDIA ") if cuda else ""  # H100 SXM, PCIe, NVL differ
peak = args.peak_flops or {"H100 80GB HBM3": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H200": 989e12,
                           "H200 NVL": 835e12}.get(gpu, 312e12 if "A100" in gpu else None)  # dense bf16
bar = tqdm(range(start, end), initial=start, total=total_steps, disable=not master,
           desc="train (LIMA's recipe)" if args.init else "train (tiny demo)")
diverged = lambda what: fail(f"non-finite {what} at step {step + 1} (epoch {epoch + 1}); stopped before "
                             f"saving it: everything in {out} is from before it")  # checked before any save
for step in bar:
    t0 = time.time()
    epoch, k = divmod(step, steps_per_epoch)
    order = torch.randperm(len(train["ids"]), generator=torch.Generator().manual_seed(args.seed + epoch))
    batch = order[k * args.batch_size : (k + 1) * args.batch_size].tolist()
    lr = args.lr + (args.min_lr - args.lr) * step / max(1, total_steps - 1)  # LIMA §3: no warmup, linear
    for group in optimizer.param_groups:
        group["lr"] = lr
    # the loss is summed over supervised tokens and divided by their count in the whole global batch, so the
    # update does not depend on world size or micro-batching; x world as FSDP averages gradients over ranks
    n_target = sum(int(train["mask"][i][1:].sum()) for i in batch)
    torch.manual_seed(args.seed + step * world + rank)  # dropout masks: a resumed run draws the same
    loss_sum, pad = torch.zeros((), device=device), 0
    for loss, padded in micro_losses(train, batch):  # FSDP reduce-scatters each one's gradients: sharded
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
        flops = sum(6 * n_matmul * t + 12 * shape.n_layers * shape.dim * t * t for t in lengths)
        log["mfu"] = flops / (seconds * peak * world)
    if master:
        bar.set_postfix(loss=f"{log['loss']:.3f}", lr=f"{lr:.1e}", tok_s=log["tokens_per_s"],
                        **({"mfu": f"{log['mfu']:.0%}"} if peak else {}))
        print(json.dumps(log), file=logf)
    saving = k == steps_per_epoch - 1 or step + 1 == end
    if saving and all_sum(torch.stack([~torch.isfinite(q.to_local() if isinstance(q, DTensor) else q).all()
                                       for q in params]).any().item())[0]:
        diverged("weights")
    if k == steps_per_epoch - 1:  # end of an epoch: the dev loss, and the epoch saved
        model.eval()
        with torch.no_grad():
            dev_sum = all_sum(sum(loss.item() for loss, _ in micro_losses(dev, range(len(dev["ids"])))))[0]
            dev_loss = dev_sum / n_dev if n_dev else None
            if dev_loss is not None and not math.isfinite(dev_loss):
                diverged("dev loss")
            if master:
                tqdm.write(f"epoch {epoch + 1}: dev loss {dev_loss}")
                print(json.dumps({"epoch": epoch + 1, "dev_loss": dev_loss}), file=logf)
            if epoch + 1 in save_epochs:
                save_epoch(epoch + 1, dev_loss)
        model.train()
    if saving:  # weights, AdamW state and step; each rank writes its shards
        model_state, optim_state = get_state_dict(model, optimizer)
        tmp, final = (out / "resume" / f"{pre}step_{step + 1:06d}" for pre in (".tmp_", ""))
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)
        if master:  # a new step number: one atomic rename puts it in place, then the older states go
            (tmp / "run.json").write_text(json.dumps(run))
            tmp.rename(final)
            for old in (out / "resume").iterdir():
                if old != final:
                    shutil.rmtree(old)
if distributed:
    dist.destroy_process_group()
    # all is on disk. FSDP still holds the process group; a gloo thread freeing a finished broadcast's tensors
    # takes the GIL, which aborts the process if Python is tearing itself down: skip the teardown
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)
