"""
Fine-tune LLaMA on LIMA's dialogues with the plain next-token loss (Zhou et al., 2023, §3).

    python train.py                                                     # the CPU demo: a tiny model from scratch
    torchrun --nproc_per_node 8 train.py --size 7B --init llama/7B --data data/lima
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        train.py --size 65B --init llama/65B --data data/lima

Master weights and AdamW state stay in float32 (LIMA's 1e-6 updates vanish in bf16 weights); on CUDA the
arithmetic runs in bf16. 7B and up shard parameters, gradients and optimizer state with FSDP2, one unit per block.
"""
import argparse, functools, hashlib, json, math, os, shutil, sys, time, warnings
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from model import CheckpointError, ModelArgs, Tokenizer, Transformer, generate

p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
p.add_argument("--size", default="tiny", help="tiny (from scratch, for a CPU) or 7B, 13B, 33B, 65B (with --init)")
p.add_argument("--init", help="pretrained LLaMA directory, Meta or Hugging Face layout")
p.add_argument("--data", default="data/prepared", help="prepare.py's output")
p.add_argument("--out", default="out")
p.add_argument("--epochs", type=int, help="LIMA: 15")
p.add_argument("--lr", type=float, help="LIMA: 1e-5 at the first step, no warmup")
p.add_argument("--min_lr", type=float, help="LIMA: 1e-6 at the last step, linearly")
p.add_argument("--batch_size", type=int, help="dialogues per optimizer step; LIMA: 32, 64 for 7B")
p.add_argument("--dropout", type=float, help="residual dropout at the top layer; LIMA: 0.3, 0.2 for 7B")
p.add_argument("--weight_decay", type=float, default=0.1)
p.add_argument("--beta1", type=float, default=0.9)
p.add_argument("--beta2", type=float, default=0.95)
p.add_argument("--max_len", type=int, default=2048, help="trim dialogues to this many tokens")
p.add_argument("--tokens_per_micro", type=int, default=2048, help="tokens (padding included) per forward pass")
p.add_argument("--parallel", choices=["ddp", "fsdp"], help="default: ddp for tiny, fsdp for 7B and up")
p.add_argument("--act_ckpt", type=int, choices=[0, 1], help="recompute activations in backward; default: 1 for 7B+")
p.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype; default: bfloat16 on CUDA")
p.add_argument("--dev_samples", type=int, default=50, help="dev prompts answered at each saved epoch")
p.add_argument("--max_new_tokens", type=int, help="per sampled answer; LIMA: 2048")
p.add_argument("--save_epochs", default="5-10", help='"5-10" (LIMA\'s choice), "all" or "1,3,7"; last always')
p.add_argument("--resume", action="store_true", help="continue from OUT/resume/")
p.add_argument("--seed", type=int, default=1337)
p.add_argument("--steps", type=int, help="stop (resumably) after this many optimizer steps in total")
for k in ("dim", "n_layers", "n_heads"):
    p.add_argument(f"--{k}", type=int, help="tiny only: the model's shape")
args = p.parse_args()

# LIMA §3 by default; tiny learns from scratch on a CPU in minutes, so it takes far larger steps
LIMA = dict(epochs=15, lr=1e-5, min_lr=1e-6, batch_size=32, dropout=0.3, parallel="fsdp", act_ckpt=1, max_new_tokens=2048)
SIZES = {"tiny": dict(epochs=10, lr=3e-3, min_lr=3e-4, batch_size=4, dropout=0.0, parallel="ddp", act_ckpt=0,
                      max_new_tokens=256),
         "7B": dict(batch_size=64, dropout=0.2)}  # "64 for smaller models"
for k, v in {**LIMA, **SIZES.get(args.size, {})}.items():
    setattr(args, k, v if getattr(args, k) is None else getattr(args, k))

fail = lambda msg: sys.exit(f"error: {msg}")  # one line, no traceback
for ok, flag, want in [
        (args.size in ("tiny", "7B", "13B", "30B", "33B", "65B"), "size", "tiny, 7B, 13B, 33B (or 30B) or 65B"),
        (args.epochs >= 1, "epochs", ">= 1"), (args.batch_size >= 1, "batch_size", ">= 1"), (args.lr > 0, "lr", "> 0"),
        (0 <= args.dropout < 1, "dropout", "in [0, 1)"), (args.max_len >= 2, "max_len", ">= 2"),
        (args.tokens_per_micro >= 1, "tokens_per_micro", ">= 1"), (args.dev_samples >= 0, "dev_samples", ">= 0")]:
    if not ok:
        fail(f"--{flag} {getattr(args, flag)}: expected {want}")
if args.size != "tiny" and not args.init:
    fail(f"--size {args.size} needs --init DIR with pretrained LLaMA weights: LIMA fine-tunes, it never trains from scratch")
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
if distributed:
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
bf16 = (args.dtype or ("bfloat16" if device.type == "cuda" else "float32")) == "bfloat16"  # bf16 on a CPU is slow
autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
fsdp, ddp = distributed and args.parallel == "fsdp", distributed and args.parallel == "ddp"
out = Path(args.out)
warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # DCP in one process: that is the intent

# -----------------------------------------------------------------------------
# data: prepare.py's token ids and loss masks (true on the assistant's tokens and their EOT)
data = Path(args.data)
if not data.is_dir():
    fail(f"--data {data}: no such directory (make it with: python prepare.py --out {data})")
try:
    tokenizer = Tokenizer(data / "tokenizer.model")
    train, dev = (torch.load(data / f"{split}.pt", weights_only=True) for split in ("train", "dev"))
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
        src = Transformer.from_pretrained(args.init, vocab_size=n_words, dropout=args.dropout)  # LIMA §2: adds EOT
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
with torch.device("meta"):
    model = Transformer(model_args[0])
if args.act_ckpt:  # keep only each block's input; recompute the rest in the backward pass
    for block in model.layers:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
if fsdp:  # one all-gather/reduce-scatter unit per block; bf16 on the wire and in the matmuls, fp32 reductions
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
model.to_empty(device=device)  # float32: the master weights
set_model_state_dict(model, src.state_dict() if master else {},
                     options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=distributed))
del src
raw = model  # the bare Transformer (FSDP2 shards it in place; DDP wraps it)
if ddp:
    model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

# AdamW; weight decay on matrices and embeddings, not on the norms' gains
params = [q for q in raw.parameters() if q.requires_grad]
optimizer = torch.optim.AdamW([{"params": [q for q in params if q.dim() >= 2], "weight_decay": args.weight_decay},
                               {"params": [q for q in params if q.dim() < 2], "weight_decay": 0.0}],
                              lr=args.lr, betas=(args.beta1, args.beta2))
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
    """OUT/epoch_NN/ in Meta's layout (bf16), loadable by Transformer.from_pretrained and sample.py, with LIMA-sampled
    answers to the dev prompts: what LIMA chose its checkpoint from (§3)."""
    raw.eval()
    n = min(args.dev_samples, len(dev["ids"]))
    convs = dev["conversations"][rank:n:world]  # each rank answers its share of the prompts
    prompts = [tokenizer.encode_dialogue(c[:1])[0] for c in convs]
    answers = [[] for _ in prompts]
    if prompts:  # a bf16 cache under bf16 compute: 65B's float32 cache would take 5 MB a token
        raw.setup_cache(len(prompts), min(raw.args.max_seq_len, max(map(len, prompts)) + args.max_new_tokens),
                        dtype=torch.bfloat16 if bf16 else None)
    g = torch.Generator(device).manual_seed(args.seed + epoch * world + rank)
    steps = generate(raw, prompts, tokenizer.eot_id, args.max_new_tokens, generator=g) if prompts else iter(())
    with autocast:
        while True:  # one forward per rank per turn, in lockstep: FSDP gathers each block's weights collectively
            nxt = next(steps, None)  # runs a forward unless this rank's answers are complete
            if nxt is None:
                raw(torch.zeros(1, 1, dtype=torch.long, device=device))  # join the others' gathers
            else:
                for a, t in zip(answers, nxt.tolist()):
                    a += [t] if t >= 0 else []  # -1: that answer has ended
            if all_sum(nxt is not None)[0] == 0:
                break
    raw.clear_cache()
    eot = tokenizer.eot_id
    rows = [{"prompt": c[0], "response": tokenizer.decode(a[: a.index(eot)] if eot in a else a), "ended": eot in a}
            for c, a in zip(convs, answers)]
    if distributed:  # back in prompt order on rank 0: prompt k was rank k % world's (k // world)-th
        shares = [None] * world if master else None
        dist.gather_object(rows, shares, dst=0)
        rows = [shares[k % world][k // world] for k in range(n)] if master else rows
    raw.train()
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not master:
        return
    tmp, final = out / f".tmp_epoch_{epoch:02d}", out / f"epoch_{epoch:02d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for k in state:  # one tensor at a time: never a float32 and a bf16 copy of the whole model at once
        state[k] = state[k].to(torch.bfloat16)
    torch.save(state, tmp / "consolidated.00.pth")
    (tmp / "params.json").write_text(json.dumps(asdict(raw.args), indent=2))
    shutil.copy(data / "tokenizer.model", tmp / "tokenizer.model")
    (tmp / "samples.jsonl").write_text("".join(json.dumps({"epoch": epoch, "dev_loss": dev_loss, **r}) + "\n" for r in rows))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


start = 0
if args.resume:  # data order, dropout masks and lr are functions of the step: weights and AdamW state are all we need
    saved = sorted((out / "resume").glob("step_*"))
    if not saved:
        fail(f"--resume: nothing saved in {out / 'resume'}")
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=saved[-1])
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    start = int(saved[-1].name[5:])
if master:  # OUT/log.jsonl: one JSON object a line, the settings first with LIMA's defaults filled in
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / "log.jsonl", "a" if args.resume else "w", buffering=1)
    print(json.dumps({"config": vars(args), "world_size": world, "compute_dtype": "bfloat16" if bf16 else "float32"}), file=logf)

# -----------------------------------------------------------------------------
end = min(total_steps, args.steps or total_steps)
n_params = sum(q.numel() for q in params)
peak = next((f for name, f in {"A100": 312e12, "H100": 989e12, "H200": 989e12}.items()
             if device.type == "cuda" and name in torch.cuda.get_device_name()), None)  # dense bf16 FLOP/s
bar = tqdm(range(start, end), initial=start, total=total_steps, disable=not master, desc="train")
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
    # does not depend on world size or micro-batching; x world because DDP and FSDP average gradients over ranks
    n_target = sum(int(train["mask"][i][1:].sum()) for i in batch)
    torch.manual_seed(args.seed + step * world + rank)  # dropout masks: a resumed run draws the same
    micros, loss_sum, pad = plan(train, batch), torch.zeros((), device=device), 0
    for j, micro in enumerate(micros):
        # DDP: all-reduce once, after the last micro-batch (FSDP reduce-scatters each, to keep gradients sharded)
        with model.no_sync() if ddp and j < len(micros) - 1 else nullcontext():
            loss, padded = micro_loss(train, micro)
            (loss * world / n_target).backward()
        loss_sum, pad = loss_sum + loss.detach(), pad + padded  # no host sync per micro-batch
    loss_sum, pad = all_sum(loss_sum.item(), pad)
    if not math.isfinite(loss_sum):
        fail(f"non-finite loss at step {step + 1} (epoch {epoch + 1}); the checkpoints in {out} are from before it")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = sum(len(train["ids"][i]) - 1 for i in batch)
    tps = tokens / (time.time() - t0)
    log = dict(step=step + 1, epoch=epoch + 1, loss=loss_sum / n_target, lr=lr, tokens=tokens,
               pad=pad / (pad + tokens), tokens_per_s=round(tps))
    if peak:
        log["mfu"] = 6 * n_params * tps / (peak * world)  # 6 FLOPs per parameter per token, forward and backward
    if master:
        bar.set_postfix(loss=f"{log['loss']:.3f}", lr=f"{log['lr']:.1e}", tok_s=log["tokens_per_s"],
                        **({"mfu": f"{log['mfu']:.0%}"} if peak else {}))
        print(json.dumps(log), file=logf)
    if k == steps_per_epoch - 1:  # end of an epoch
        dev_loss = evaluate()
        if master:
            tqdm.write(f"epoch {epoch + 1}: dev loss {dev_loss}")
            print(json.dumps({"epoch": epoch + 1, "dev_loss": dev_loss}), file=logf)
        if epoch + 1 in save_epochs:
            save_epoch(epoch + 1, dev_loss)
    if k == steps_per_epoch - 1 or step + 1 == end:  # weights, AdamW state and step; each rank writes its shards
        model_state, optim_state = get_state_dict(model, optimizer)
        tmp, final = out / "resume" / f".tmp_step_{step + 1:06d}", out / "resume" / f"step_{step + 1:06d}"
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)
        if master:
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in (out / "resume").glob("step_*"):
                if old != final:
                    shutil.rmtree(old)
bar.close()
if distributed:
    dist.destroy_process_group()
