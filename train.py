"""
Fine-tune LLaMA on LIMA's dialogues with the plain next-token loss (Zhou et al., 2023, §3).

    python train.py                                        # the CPU demo: a tiny model from scratch
    torchrun --nproc_per_node 8 train.py --size 7B --data data/lima     # LLaMA-1 7B from llama/7B
    torchrun --nproc_per_node 8 train.py --init TinyLlama-1.1B --data data/lima   # any LLaMA

Master weights and AdamW state stay in float32 (LIMA's 1e-6 updates vanish in bf16 weights); on
CUDA the arithmetic runs in bf16. Under torchrun FSDP2 shards weights, gradients and AdamW state,
one unit per block.
"""
import argparse
import functools
import hashlib
import json
import math
import os
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path


def refuse(message: str):
    """Stop with one line. Under torchrun every rank meets the same refusal at about the same time:
    rank 0 says it, and torchrun, seeing rank 0 fail, stops the others while they wait. A failure
    of one rank's own (its disk) is said by that rank when the wait is over."""
    if int(os.environ.get("RANK", 0)) != 0:
        time.sleep(10)  # torchrun looks at its processes every 0.1 s (--monitor-interval)
    sys.exit(f"error: {message}")


# -----------------------------------------------------------------------------
# flags, checked before torch loads (a bad value is refused at once). LIMA's recipe is filled in
# below, once the model's size is known; these say what it will be
parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
parser.add_argument("--size", help="LLaMA-1's 7B, 13B, 33B (30B) or 65B: fine-tunes llama/SIZE "
                    "unless --init; tiny: the demo")
parser.add_argument("--init", help="a pretrained LLaMA-family directory (Meta or Hugging Face)")
parser.add_argument("--data", default="data/prepared", help="prepare.py's output (%(default)s)")
parser.add_argument("--out", default="out", help="epochs, resume state and log (%(default)s)")
parser.add_argument("--epochs", type=int, help="LIMA: 15; the tiny demo: 10")
parser.add_argument("--lr", type=float, help="start of the linear decay; LIMA: 1e-5; tiny: 3e-3")
parser.add_argument("--min_lr", type=float, help="end of the linear decay; LIMA: 1e-6; tiny: 3e-4")
parser.add_argument("--batch_size", type=int, help="dialogues a step; LIMA: 64 under 10B "
                    "parameters, 32 above; tiny: 4")
parser.add_argument("--dropout", type=float, help="residual dropout at the top layer; LIMA: 0.2 "
                    "under 10B parameters, 0.3 above; tiny: 0.0")
parser.add_argument("--act_ckpt", type=int, help="1: recompute activations in the backward pass; "
                    "LIMA: 1; tiny: 0")
parser.add_argument("--max_new_tokens", type=int, help="length of the dev answers saved with an "
                    "epoch; LIMA: 128 (a preview); tiny: 256")
parser.add_argument("--weight_decay", type=float, default=0.1, help="AdamW; LIMA: %(default)s")
parser.add_argument("--beta1", type=float, default=0.9, help="AdamW; LIMA: %(default)s")
parser.add_argument("--beta2", type=float, default=0.95, help="AdamW; LIMA: %(default)s")
parser.add_argument("--seed", type=int, default=1337, help="data order, dropout (%(default)s)")
parser.add_argument("--max_len", type=int, default=2048, help="trim dialogues (LIMA: %(default)s)")
parser.add_argument("--tokens_per_micro", type=int, default=2048,
                    help="tokens per forward pass, padding included (default: %(default)s)")
parser.add_argument("--dtype", choices=["float32", "bfloat16"],
                    help="compute dtype; default: bfloat16 on CUDA, float32 on a CPU")
parser.add_argument("--dev_samples", type=int, default=50,
                    help="dev prompts answered at each saved epoch (default: %(default)s)")
parser.add_argument("--save_epochs", default="5-10",
                    help='"5-10" (LIMA\'s choice, the default), "all" or "1,3,7"; the last '
                    "is always saved")
parser.add_argument("--resume", action="store_true", help="continue from OUT/resume/")
parser.add_argument("--peak_flops", type=float,
                    help="a GPU's dense bf16 FLOP/s for the MFU; default: known GPUs'")
parser.add_argument("--steps", type=int, help="stop (resumably) after this many steps in total")
parser.add_argument("--dim", type=int, help="tiny only: the model's width")
parser.add_argument("--n_layers", type=int, help="tiny only: the model's depth")
parser.add_argument("--n_heads", type=int, help="tiny only: the model's heads")
args = parser.parse_args()

if args.size not in (None, "tiny", "7B", "13B", "30B", "33B", "65B"):
    refuse(f"--size {args.size}: expected 7B, 13B, 33B (or 30B), 65B or tiny; "
           "another base model: --init DIR")
if args.size == "tiny" and args.init:
    refuse("--size tiny is the demo from scratch: leave it out to fine-tune --init with "
           "LIMA's recipe")
if args.size not in (None, "tiny") and not args.init:
    args.init = f"llama/{args.size}"  # the README's layout
if args.init and not Path(args.init).is_dir():
    hint = ""
    if args.size:
        hint = f" (--size {args.size} fine-tunes llama/{args.size} unless --init names another)"
    refuse(f"--init {args.init}: no such directory{hint}")
checks = [
    ("epochs", args.epochs is None or args.epochs >= 1, ">= 1"),
    ("act_ckpt", args.act_ckpt in (None, 0, 1), "0 or 1"),
    ("batch_size", args.batch_size is None or args.batch_size >= 1, ">= 1"),
    ("lr", args.lr is None or args.lr > 0, "> 0"),
    ("dropout", args.dropout is None or 0 <= args.dropout < 1, "in [0, 1)"),
    ("tokens_per_micro", args.tokens_per_micro >= 1, ">= 1"),
    ("max_len", args.max_len >= 2, ">= 2"),
    ("dev_samples", args.dev_samples >= 0, ">= 0"),
]
for flag, ok, expected in checks:
    if not ok:
        refuse(f"--{flag} {getattr(args, flag)}: expected {expected}")
save_epochs = set()  # besides the last epoch, always saved; "all" is filled in with the recipe
try:
    if "-" in args.save_epochs:
        first, last = map(int, args.save_epochs.split("-"))
        save_epochs = set(range(first, last + 1))
    elif args.save_epochs != "all":
        save_epochs = set(map(int, args.save_epochs.split(",")))
except ValueError:
    refuse(f"--save_epochs {args.save_epochs!r}: expected 'all', a range like 5-10 or a "
           "list like 1,3,7")

import torch  # noqa: E402 (seconds to load: only once the flags are known to be good)
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.distributed.checkpoint.state_dict import StateDictOptions  # noqa: E402
from torch.distributed.checkpoint.state_dict import set_model_state_dict  # noqa: E402
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
import torch.utils.checkpoint  # noqa: E402
from tqdm import tqdm  # noqa: E402

from checkpoint import (CheckpointError, check_out_is_free, check_resume, latest_resume,  # noqa
                        load_model, load_resume, lock_out, save_epoch, save_resume, trim_log)
from model import ModelArgs, Tokenizer, Transformer, generate  # noqa: E402

# -----------------------------------------------------------------------------
# processes: torchrun sets RANK, WORLD_SIZE and LOCAL_RANK on every node; plain python is one
distributed = "WORLD_SIZE" in os.environ
rank = int(os.environ.get("RANK", 0))
world = int(os.environ.get("WORLD_SIZE", 1))
master = rank == 0
cuda = torch.cuda.is_available()
device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
if cuda:
    torch.cuda.set_device(device)
if distributed:
    # 1 h, not NCCL's 10 min: the others wait while rank 0 alone reads 65B's 130 GB, or saves;
    # device_id binds NCCL to the GPU now
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, timeout=timedelta(hours=1),
                            device_id=device if cuda else None)


def all_sum(*values) -> list:
    """Each value summed over all ranks, on every rank."""
    totals = torch.tensor(values, dtype=torch.float64, device=device)
    if distributed:
        dist.all_reduce(totals)
    return totals.tolist()


bf16 = (args.dtype or ("bfloat16" if cuda else "float32")) == "bfloat16"  # bf16 on a CPU is slow
autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # DCP in one process
out = Path(args.out)
try:  # refused now, and checked again under the lock before anything is written
    check_out_is_free(out, args.resume)
except CheckpointError as e:
    refuse(str(e))
resume_dir = latest_resume(out) if args.resume else None
if distributed and world > int(os.environ.get("LOCAL_WORLD_SIZE", world)):
    # several nodes: every rank writes into --out (its epoch rows, its resume shards), so all must
    # see one directory. Rank 0 writes a token; a rank that cannot read it back sees another one
    token_file = out / f".shared_{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}"
    token = [os.urandom(8).hex()]
    if master:
        out.mkdir(parents=True, exist_ok=True)
        token_file.write_text(token[0])
    dist.broadcast_object_list(token, src=0)
    sees_it = token_file.is_file() and token_file.read_text() == token[0]
    n_blind = int(all_sum(not sees_it)[0])  # once every rank has looked
    if master:
        token_file.unlink()
    if n_blind:
        refuse(f"--out {out}: {n_blind} of {world} ranks do not see rank 0's "
               "files there: on several nodes --out must be on a filesystem every node shares")
if args.resume and resume_dir is None and not (out / "log.jsonl").exists():
    refuse(f"--resume: nothing saved in {out / 'resume'}")
if args.resume and resume_dir is None and master:  # killed before its first save: no dead end
    print(f"--resume: nothing saved in {out / 'resume'} yet: starting again from step 0 in {out} "
          "(its complete epochs stay until this run writes them anew)", file=sys.stderr)


def sha256(*files) -> str:
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.read_bytes())
    return digest.hexdigest()


# -----------------------------------------------------------------------------
# data: prepare.py's token ids and loss masks (true on the assistant's tokens and their EOT)
data_dir = Path(args.data)
if not data_dir.is_dir():
    refuse(f"--data {data_dir}: no such directory (make it with: python prepare.py "
           f"--out {data_dir})")
tokenizer_file = data_dir / "tokenizer.model"
try:
    tokenizer = Tokenizer(tokenizer_file)
    tokenizer_sha = sha256(tokenizer_file)
    train = torch.load(data_dir / "train.pt", weights_only=True)
    dev = torch.load(data_dir / "dev.pt", weights_only=True)
    data_sha = sha256(data_dir / "train.pt", data_dir / "dev.pt")  # a resumed run needs the same
except Exception as e:
    refuse(f"--data {data_dir}: cannot read tokenizer.model, train.pt and dev.pt ({e}); "
           "run prepare.py")
n_words = tokenizer.n_words
for split, d in (("train", train), ("dev", dev)):
    if not isinstance(d, dict) or not {"ids", "mask", "conversations"} <= d.keys():
        refuse(f"{data_dir / split}.pt is not prepare.py's output (ids, mask and "
               "conversations); rerun prepare.py")
    made_by = [d.get("n_words"), d.get("eot_id"), d.get("tokenizer_sha256")]
    out_of_vocabulary = any(x.max() >= n_words for x in d["ids"])
    if made_by != [n_words, n_words - 1, tokenizer_sha] or out_of_vocabulary:
        refuse(f"{data_dir / split}.pt was not tokenized with {tokenizer_file} "
               f"({n_words} words, EOT {n_words - 1}); rerun prepare.py")
    d["ids"] = [x[: args.max_len] for x in d["ids"]]  # LIMA §3: texts trimmed
    d["mask"] = [m[: args.max_len] for m in d["mask"]]
# a dialogue trimmed before its first answer has nothing to train on (a batch of only those: 0/0)
keep = [i for i, m in enumerate(train["mask"]) if m[1:].any()]
if master and len(keep) < len(train["ids"]):
    print(f"warning: {len(train['ids']) - len(keep)} dialogues have no answer token within "
          f"--max_len {args.max_len}; skipping them", file=sys.stderr)
if not keep:
    refuse(f"{data_dir / 'train.pt'}: no dialogue with an answer token within "
           f"--max_len {args.max_len}")
for column in ("ids", "mask", "conversations"):
    train[column] = [train[column][i] for i in keep]

# -----------------------------------------------------------------------------
# model: the starting weights exist whole only on rank 0 (memory-mapped for a LLaMA); the others
# get them by broadcast. LLaMA's tokenizer.model lies beside the weights or one level up
source = None
if master and args.init:
    init = Path(args.init)
    candidates = (init / "tokenizer.model", init.parent / "tokenizer.model")
    beside = [t for t in candidates if t.is_file()]
    if beside and sha256(beside[0]) != tokenizer_sha:
        refuse(f"{beside[0]} differs from {tokenizer_file}: prepare the data with it")
    try:
        source = load_model(init, vocab_size=n_words)  # LIMA §2: adds EOT
    except CheckpointError as e:
        refuse(str(e))
elif master:
    torch.manual_seed(args.seed)
    # the demo's model, in another shape where --dim, --n_layers or --n_heads say so
    shape = {k: getattr(args, k) for k in ("dim", "n_layers", "n_heads") if getattr(args, k)}
    tiny = ModelArgs.from_size("tiny", vocab_size=n_words, max_seq_len=args.max_len, **shape)
    source = Transformer(tiny)
if master:
    n_params = sum(p.numel() for p in source.parameters())
    shared = [(source.args, n_params)]
else:
    shared = [None]
if distributed:
    dist.broadcast_object_list(shared, src=0)
model_args, n_params = shared[0]

# LIMA §3's recipe for a pretrained model: batch 64 and dropout 0.2 for "smaller models" (the
# paper names 7B; here: under 10B parameters), 32 and 0.3 above. Dev answers are a 128-token
# preview (README: LIMA's 2,048 cost hours at 65B). The tiny demo learns from scratch on a CPU
# in minutes: far larger steps
smaller = n_params < 10e9
if args.init:
    recipe = dict(epochs=15, lr=1e-5, min_lr=1e-6, act_ckpt=1, max_new_tokens=128,
                  batch_size=64 if smaller else 32, dropout=0.2 if smaller else 0.3)
    group = "smaller models (under" if smaller else "larger models (over"
    preset = f"LIMA's for {group} 10B parameters): {args.init} has {n_params / 1e9:.2f}B"
else:
    recipe = dict(epochs=10, lr=3e-3, min_lr=3e-4, act_ckpt=0, max_new_tokens=256,
                  batch_size=4, dropout=0.0)
    preset = "the tiny demo's, from scratch (not LIMA's: far larger steps, for a CPU)"
for flag, value in recipe.items():
    if getattr(args, flag) is None:
        setattr(args, flag, value)
if args.save_epochs == "all":
    save_epochs = set(range(1, args.epochs + 1))
save_epochs.add(args.epochs)
if args.size and args.init:
    llama = ModelArgs.from_size(args.size)
    if (model_args.dim, model_args.n_layers, model_args.n_heads) != (
            llama.dim, llama.n_layers, llama.n_heads):
        refuse(f"--size {args.size}: {args.init} is not LLaMA-1 {args.size} (dim "
               f"{model_args.dim}, {model_args.n_layers} layers, {model_args.n_heads} heads, "
               f"{n_params / 1e9:.2f}B parameters); leave out --size to fine-tune it as it is")
model_args.dropout = args.dropout
# what a resume depends on (world size and micro-batching change nothing: see the loss below)
run = {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "min_lr", "weight_decay",
                                     "beta1", "beta2", "seed", "max_len", "dropout")}
run["dtype"] = "bfloat16" if bf16 else "float32"
run["data"] = data_sha
run["model"] = vars(model_args)
run = json.loads(json.dumps(run))  # as run.json reads back: tuples become lists
if resume_dir is not None:
    try:
        check_resume(resume_dir, run, data_dir)
    except CheckpointError as e:
        refuse(f"--resume: {e}")

with torch.device("meta"):
    model = Transformer(model_args)
if args.act_ckpt:  # keep only each block's input; recompute the rest in the backward pass
    for block in model.layers:
        recomputed = functools.partial(torch.utils.checkpoint.checkpoint, block.forward,
                                       use_reentrant=False)
        block.forward = recomputed
if distributed:
    # one unit per block: bf16 gathers and matmuls, fp32 gradient reductions. Inputs not cast:
    # RoPE's tables stay float32 as in sample.py (the hidden state is bf16 from the embedding on)
    mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                     reduce_dtype=torch.float32, cast_forward_inputs=False)
    for unit in [*model.layers, model]:
        fully_shard(unit, mp_policy=mp_policy)
model.to_empty(device=device)  # float32: the master weights
options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=distributed)
set_model_state_dict(model, source.state_dict() if master else {}, options=options)
source = None

# AdamW (LIMA §3); weight decay on matrices and embeddings, not on the norms' gains. Fused on CUDA:
# the default (foreach) allocates a float32 temporary the size of the local shard in step(), 16 GB
# a GPU for 65B on 16 GPUs
params = list(model.parameters())
matrices = [p for p in params if p.dim() >= 2]  # the linear layers' weights and the embedding
gains = [p for p in params if p.dim() < 2]  # RMSNorm's
groups = [{"params": matrices, "weight_decay": args.weight_decay},
          {"params": gains, "weight_decay": 0.0}]
optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2),
                              fused=cuda)
steps_per_epoch = math.ceil(len(train["ids"]) / args.batch_size)
total_steps = args.epochs * steps_per_epoch


# -----------------------------------------------------------------------------
# the loss, dev answers and the checks that end an epoch

def micro_losses(d, idx):
    """This rank's micro-batches of the dialogues idx, right-padded (causal attention keeps the
    padding out of the loss): longest first, cut at tokens_per_micro padding included so each
    holds similar lengths, dealt round-robin, as many on every rank (FSDP gathers collectively).
    Yields (summed loss, padded positions)."""
    micros = [[]]
    for i in sorted(idx, key=lambda i: -len(d["ids"][i])):
        current = micros[-1]
        longest = len(d["ids"][current[0]]) if current else 0  # its first: sorted longest first
        if (len(current) + 1) * longest > args.tokens_per_micro:
            micros.append([])
        micros[-1].append(i)
    mine = micros[rank::world]
    n_each = math.ceil(len(micros) / world)
    mine += [[]] * (n_each - len(mine))  # [] for an idle rank
    for micro in mine:
        lengths = [len(d["ids"][i]) - 1 for i in micro]  # inputs: all but the last token
        T = max(lengths, default=1)
        x = torch.zeros(max(1, len(micro)), T, dtype=torch.long)
        y = torch.full_like(x, -1)  # -1: not a training target (prompt, padding)
        for row, i in enumerate(micro):
            ids, mask = d["ids"][i], d["mask"][i]
            n = len(ids) - 1
            x[row, :n] = ids[:-1]
            y[row, :n] = torch.where(mask[1:], ids[1:], -1)
        # the logits unnamed: this suspended generator would hold them through the backward
        with autocast:
            loss = F.cross_entropy(model(x.to(device)).float().flatten(0, 1),
                                   y.to(device).flatten(), ignore_index=-1, reduction="sum")
        padded = x.numel() - sum(lengths) if micro else 0
        yield loss, padded


def answer_dev_prompts(epoch: int, dev_loss) -> list:
    """LIMA-sampled answers to the first --dev_samples dev prompts: what LIMA chose its checkpoint
    from (§3). Each rank answers its share; all run one forward a turn, in lockstep, since FSDP
    gathers each block's weights together. Rows in prompt order."""
    n = min(args.dev_samples, len(dev["ids"]))
    conversations = dev["conversations"][rank:n:world]
    prompts = [tokenizer.encode_dialogue(c[:1])[0] for c in conversations]
    answers = [[] for _ in prompts]
    steps = iter(())
    if prompts:  # a bf16 cache under bf16 compute: 65B's float32 cache would take 5 MB a token
        length = min(model_args.max_seq_len, max(map(len, prompts)) + args.max_new_tokens)
        cache_dtype = torch.bfloat16 if bf16 else None  # None: the weights' float32
        cache = model.make_cache(len(prompts), length, dtype=cache_dtype)
        generator = torch.Generator(device).manual_seed(args.seed + epoch * world + rank)
        steps = generate(model, prompts, tokenizer.eot_id, args.max_new_tokens,
                         generator=generator, cache=cache)
    with autocast:
        while True:
            tokens = next(steps, None)  # runs a forward unless this rank's answers are complete
            if tokens is None:  # join the others' gathers
                model(torch.zeros(1, 1, dtype=torch.long, device=device))
            else:
                for answer, token in zip(answers, tokens.tolist()):
                    if token >= 0:  # -1: that answer has ended
                        answer.append(token)
            if all_sum(tokens is not None)[0] == 0:
                break
    rows = []
    for conversation, answer in zip(conversations, answers):
        stopped_at_eot = tokenizer.eot_id in answer
        if stopped_at_eot:
            answer = answer[: answer.index(tokenizer.eot_id)]
        rows.append({"epoch": epoch, "dev_loss": dev_loss, "prompt": conversation[0],
                     "response": tokenizer.decode(answer), "stopped_at_eot": stopped_at_eot})
    shares = [rows] * world
    if distributed:
        dist.all_gather_object(shares, rows)
    return [shares[k % world][k // world] for k in range(n)]  # prompt k was rank k % world's


def weights_are_finite() -> bool:
    """On every rank: no NaN or inf in any rank's shard (one host sync)."""
    shards = [p.to_local() if isinstance(p, DTensor) else p for p in params]
    finite = torch.stack([torch.isfinite(shard).all() for shard in shards]).all()
    n_bad = all_sum(not finite.item())[0]
    return n_bad == 0


def stop_diverged(what: str, step: int, epoch: int):
    refuse(f"non-finite {what} at step {step + 1} (epoch {epoch + 1}); stopped before "
           f"saving it: everything in {out} is from before it")


# -----------------------------------------------------------------------------
# this run's --out: the lock, the resume state, the log
if master:  # rank 0 holds OUT/.lock while the run lives
    try:
        lock = lock_out(out)
        check_out_is_free(out, args.resume)
    except CheckpointError as e:
        refuse(str(e))
start = 0
if resume_dir is not None:  # the step fixes data order, dropout and lr: weights and AdamW suffice
    try:
        load_resume(resume_dir, model, optimizer, rank, world)
    except CheckpointError as e:
        refuse(f"--resume: {e}")
    start = int(resume_dir.name.removeprefix("step_"))
    if master:
        trim_log(out, start, steps_per_epoch)
if master:  # OUT/log.jsonl: one JSON object a line, the settings first, the recipe filled in
    epochs = f"{args.epochs} epoch" + "s" * (args.epochs != 1)
    print(f"recipe: {preset}; {epochs}, batch {args.batch_size}, lr {args.lr:g} to "
          f"{args.min_lr:g}, dropout {args.dropout}", file=sys.stderr)
    log_file = open(out / "log.jsonl", "a" if resume_dir else "w", buffering=1)
    settings = {"config": vars(args), "preset": preset, "world_size": world,
                "compute_dtype": "bfloat16" if bf16 else "float32"}
    print(json.dumps(settings), file=log_file)

# MFU per token: 6 FLOPs a matmul weight + 12 * layers * dim * T in attention over T tokens (PaLM,
# app. B), against the GPU's dense bf16 peak; H100 SXM, PCIe and NVL differ
# the embedding is a lookup, not a matmul
n_matmul = sum(p.numel() for p in params) - model.tok_embeddings.weight.numel()
gpu = torch.cuda.get_device_name().removeprefix("NVIDIA ") if cuda else ""
PEAK_FLOPS = {"H100 80GB HBM3": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12,
              "H200": 989e12, "H200 NVL": 835e12}
peak = args.peak_flops or PEAK_FLOPS.get(gpu, 312e12 if "A100" in gpu else None)

# -----------------------------------------------------------------------------
# the loop
end = min(total_steps, args.steps or total_steps)
n_dev = sum(int(m[1:].sum()) for m in dev["mask"])  # supervised dev tokens
desc = "train (LIMA's recipe)" if args.init else "train (tiny demo)"
bar = tqdm(range(start, end), initial=start, total=total_steps, desc=desc,
           disable=not master)  # rank 0's
for step in bar:
    t0 = time.time()
    epoch, k = divmod(step, steps_per_epoch)
    shuffle = torch.Generator().manual_seed(args.seed + epoch)
    order = torch.randperm(len(train["ids"]), generator=shuffle)
    first = k * args.batch_size
    batch = order[first : first + args.batch_size].tolist()
    # LIMA §3: no warmup, linear from --lr at the first step to --min_lr at the last
    lr = args.lr + (args.min_lr - args.lr) * step / max(1, total_steps - 1)
    for group in optimizer.param_groups:
        group["lr"] = lr
    # the loss is summed over supervised tokens and divided by their count in the whole global
    # batch, so the update does not depend on world size or micro-batching; x world as FSDP
    # averages gradients over ranks
    n_target = sum(int(train["mask"][i][1:].sum()) for i in batch)
    torch.manual_seed(args.seed + step * world + rank)  # dropout: a resumed run draws the same
    loss_sum = torch.zeros((), device=device)
    pad = 0
    for loss, padded in micro_losses(train, batch):  # FSDP reduce-scatters each one's gradients
        (loss * world / n_target).backward()
        loss_sum = loss_sum + loss.detach()  # no host sync per micro-batch
        pad += padded
    loss_sum, pad = all_sum(loss_sum.item(), pad)
    if not math.isfinite(loss_sum):
        stop_diverged("loss", step, epoch)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    lengths = [len(train["ids"][i]) - 1 for i in batch]
    tokens = sum(lengths)
    seconds = time.time() - t0
    log = dict(step=step + 1, epoch=epoch + 1, loss=loss_sum / n_target, lr=lr,
               tokens=tokens, pad=pad / (pad + tokens),
               tokens_per_s=round(tokens / seconds))
    postfix = dict(loss=f"{log['loss']:.3f}", lr=f"{lr:.1e}", tok_s=log["tokens_per_s"])
    if peak:
        flops = sum(6 * n_matmul * t + 12 * model_args.n_layers * model_args.dim * t * t
                    for t in lengths)
        log["mfu"] = flops / (seconds * peak * world)
        postfix["mfu"] = f"{log['mfu']:.0%}"
    if cuda:  # the margin a user has, at once (README: memory per GPU)
        log["peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 1e9
        postfix["mem"] = f"{log['peak_reserved_gb']:.1f}GB"
    if master:
        bar.set_postfix(postfix)
        print(json.dumps(log), file=log_file)

    end_of_epoch = k == steps_per_epoch - 1
    saving = end_of_epoch or step + 1 == end
    if saving and not weights_are_finite():  # nothing is saved from diverged weights
        stop_diverged("weights", step, epoch)
    if end_of_epoch:  # the dev loss, and the epoch saved with its dev answers
        model.eval()
        with torch.no_grad():
            dev_losses = micro_losses(dev, range(len(dev["ids"])))
            my_sum = sum(loss.item() for loss, _ in dev_losses)
            dev_sum = all_sum(my_sum)[0]
            dev_loss = dev_sum / n_dev if n_dev else None
            if dev_loss is not None and not math.isfinite(dev_loss):
                stop_diverged("dev loss", step, epoch)
            if master:
                tqdm.write(f"epoch {epoch + 1}: dev loss {dev_loss}")
                print(json.dumps({"epoch": epoch + 1, "dev_loss": dev_loss}), file=log_file)
            if epoch + 1 in save_epochs:
                if master:
                    n_answers = min(args.dev_samples, len(dev["ids"]))
                    tqdm.write(f"epoch {epoch + 1}: answering {n_answers} dev prompts, then "
                               f"writing {out / f'epoch_{epoch + 1:02d}'}")
                samples = answer_dev_prompts(epoch + 1, dev_loss)
                try:
                    save_epoch(out, epoch + 1, model, tokenizer, tokenizer_file, samples, rank,
                               world)
                except CheckpointError as e:
                    refuse(str(e))
        model.train()
    if saving:  # weights, AdamW state and step; each rank writes its shards
        try:
            save_resume(out, step + 1, model, optimizer, run, rank, world)
        except CheckpointError as e:
            refuse(str(e))

if master and end < total_steps:
    print(f"stopped after step {end} of {total_steps} (--steps); continue with --resume: "
          f"{out / 'resume' / f'step_{end:06d}'}", file=sys.stderr)
elif master:
    print(f"done: {total_steps} steps; epochs in {out}", file=sys.stderr)
if distributed:
    dist.destroy_process_group()
    # All is on disk. FSDP still holds the process group; a gloo thread freeing a finished
    # broadcast's tensors takes the GIL, which aborts the process if Python is tearing itself
    # down: skip the teardown
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
