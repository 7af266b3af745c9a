"""
How fast this LLaMA decodes and trains on the device at hand, next to Hugging Face transformers'
LlamaForCausalLM of the same shape and weights (when installed), and how close both come to the
device's limit measured in the same run: read bandwidth for decoding (a step reads every weight),
matmul FLOP/s for training.

$ python bench.py decode                             # the tiny shape, LLaMA's 32,001 tokens
$ python bench.py decode --size 7B --dtype bfloat16  # on a GPU
$ python bench.py train --dim 512 --n_layers 8 --n_heads 8 --seq_len 512
$ git show HEAD~1:model.py > /tmp/before.py && python bench.py decode --against /tmp/before.py

--dim, --n_layers, --n_heads and --n_kv_heads change the shape that --size names. --against times
another model.py's generate on the same model and prompts, taking turns with this one's: a change's
before and after in one run.
"""
import argparse
import functools
import importlib.util
import time

import torch
import torch.nn.functional as F

from checkpoint import hf_name
from model import ModelArgs, Transformer, generate

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("mode", choices=["decode", "train"])
parser.add_argument("--size", default="tiny", help="tiny, 7B, 13B, 33B or 65B")
parser.add_argument("--dim", type=int)
parser.add_argument("--n_layers", type=int)
parser.add_argument("--n_heads", type=int)
parser.add_argument("--n_kv_heads", type=int)
parser.add_argument("--vocab_size", type=int, default=32001, help="LLaMA's 32,000 pieces and EOT")
parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: bfloat16 on CUDA")
parser.add_argument("--batch_size", type=int, default=1)
parser.add_argument("--prompt_len", type=int, default=32, help="decode: prompt tokens per row")
parser.add_argument("--new_tokens", type=int, default=256, help="decode: tokens made per row")
parser.add_argument("--compile", type=int, choices=[0, 1], help="decode: compile (default: CUDA)")
parser.add_argument("--row_major", action="store_true", help="decode: CPU weights row-major")
parser.add_argument("--greedy", action="store_true", help="decode: argmax, not LIMA's sampling")
parser.add_argument("--seq_len", type=int, default=256, help="train: tokens per sequence")
parser.add_argument("--steps", type=int, default=5, help="train: timed steps after a warm-up")
parser.add_argument("--repeat", type=int, default=3, help="timed runs of each; the best is kept")
parser.add_argument("--no_hf", action="store_true", help="skip transformers")
parser.add_argument("--against", help="decode: another model.py, its generate timed beside ours")
args = parser.parse_args()

cuda = torch.cuda.is_available()
device = torch.device("cuda" if cuda else "cpu")
dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
shape = {k: getattr(args, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads")}
shape = {k: v for k, v in shape.items() if v is not None}  # only the flags given change the size
margs = ModelArgs.from_size(args.size, vocab_size=args.vocab_size, **shape)
device_name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
print(f"device: {device_name}; torch {torch.__version__}; {dtype}; dim {margs.dim}, "
      f"{margs.n_layers} layers, {margs.n_heads} heads, vocab {margs.vocab_size}")


def sync():
    if cuda:
        torch.cuda.synchronize()


def best(*fns, repeat=args.repeat):
    """The shortest of repeat timed calls of each fn, after one untimed (warm-up, compilation).
    The calls take turns, so that a machine shared with other work slows each alike."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeat):
        for fn, t in zip(fns, times):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            t.append(time.perf_counter() - start)
    return [min(t) for t in times]


def read_bandwidth():
    """Bytes per second a sum of a 1 GiB tensor reads (256 MiB on a CPU)."""
    big = torch.ones(2**28 if cuda else 2**26, device=device)
    return big.numel() * 4 / best(big.sum, repeat=10)[0]


def trainer(net, loss_of):
    """args.steps optimizer steps of net on loss_of(net)."""
    # LIMA's AdamW: learning rate 1e-5, betas 0.9 and 0.95, weight decay 0.1
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1)

    def run():
        for _ in range(args.steps):
            loss_of(net).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return run


def twin(model):
    """transformers' LlamaForCausalLM of the model's shape, holding its weights; None without it."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        print("transformers is not installed: this project's figures only")
        return None
    config = LlamaConfig(
        hidden_size=margs.dim,
        intermediate_size=margs.hidden_dim,
        num_hidden_layers=margs.n_layers,
        num_attention_heads=margs.n_heads,
        num_key_value_heads=margs.n_kv_heads or margs.n_heads,
        vocab_size=margs.vocab_size,
        max_position_embeddings=margs.max_seq_len,
        rms_norm_eps=margs.norm_eps,
        rope_theta=margs.rope_theta,
        tie_word_embeddings=False,
    )
    with torch.device(device):
        hf = LlamaForCausalLM(config).to(dtype)
    # the same weights (q/k rows in Meta's rotary order): our name -> transformers' name
    hf_names = {hf_name(k, to_hf=False): k for k in hf.state_dict()}
    hf.load_state_dict({hf_names[k]: v for k, v in model.state_dict().items()})
    return hf.eval()


torch.manual_seed(0)
with torch.device(device):
    model = Transformer(margs).to(dtype)
if args.mode == "decode":
    # random weights give a flat next-token distribution, whose nucleus holds most of the
    # vocabulary; a trained model's is peaked (the top 64 tokens hold 90% at temperature 0.7):
    # scale the output to match
    with torch.no_grad():
        model.output.weight.mul_(150)
    if not cuda and not args.row_major:  # column-major, as sample.py does
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.data = m.weight.data.t().contiguous().t()

hf = None if args.no_hf else twin(model)
model.train(args.mode == "train")
# the weights a step multiplies by: all but the embedding table, a lookup
body = [p for k, p in model.named_parameters() if "tok_embeddings" not in k]

if args.mode == "decode":
    # the bound: a step reads each of those weights once, at the read bandwidth
    bandwidth = read_bandwidth()
    weights = sum(p.nbytes for p in body)
    B, n = args.batch_size, args.new_tokens
    bound = B * bandwidth / weights
    prompts = torch.randint(3, margs.vocab_size, (B, args.prompt_len), device=device)
    ours_sampling = {}  # LIMA's
    hf_sampling = dict(do_sample=True, temperature=0.7, top_p=0.9, top_k=None,
                       repetition_penalty=1.2)
    if args.greedy:
        ours_sampling = dict(temperature=0, repetition_penalty=1.0)
        hf_sampling = dict(do_sample=False, repetition_penalty=1.0)
    compiled = cuda if args.compile is None else args.compile
    if compiled and not cuda:  # as sample.py does: weights folded in, prepacked for the GEMMs
        import torch._inductor.config
        torch._inductor.config.freezing = True

    def ours(decode=generate):  # or another model.py's generate (--against)
        # stop id -2: never stops early
        steps = decode(model, prompts.tolist(), -2, n, compile=compiled, **ours_sampling)
        assert sum(1 for _ in steps) == n

    def theirs():
        hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n,
                    min_new_tokens=n, eos_token_id=None, pad_token_id=0, **hf_sampling)

    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s, {weights / 1e6:.1f} MB of weights read "
          f"per step: bound {bound:,.0f} tokens/s at batch {B}")
    runs = [ours]
    if args.against:
        spec = importlib.util.spec_from_file_location("against", args.against)
        against = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(against)
        runs.append(functools.partial(ours, against.generate))
    if hf is not None:
        runs.append(theirs)
    with torch.no_grad():
        speed = [B * n / t for t in best(*runs)]  # tokens per second
    print(f"lima:         {speed[0]:8,.0f} tokens/s  {speed[0] / bound:5.1%} of the bound  "
          f"(batch {B}, {args.prompt_len} prompt + {n} new tokens, "
          f"{'compiled' if compiled else 'eager'})")
    if args.against:
        print(f"{args.against}: {speed[1]:8,.0f} tokens/s  (lima {speed[0] / speed[1]:.2f}x)")
    if hf is not None:
        print(f"transformers: {speed[-1]:8,.0f} tokens/s  {speed[-1] / bound:5.1%} of the bound  "
              f"(lima {speed[0] / speed[-1]:.2f}x)")
else:
    # the bound: a large matmul's FLOP/s; a step's FLOPs are 6 per weight per token (forward,
    # backward) plus attention's 12 * layers * dim * seq_len per token (Chowdhery et al., 2022,
    # appendix B)
    square = torch.randn(4096, 4096, device=device, dtype=dtype)
    peak = 2 * 4096**3 / best(lambda: square @ square, repeat=5)[0]
    B, T = args.batch_size, args.seq_len
    params = sum(p.numel() for p in body)
    flops = 6 * params + 12 * margs.n_layers * margs.dim * T
    x, y = torch.randint(0, margs.vocab_size, (2, B, T), device=device)  # inputs, next tokens

    def our_loss(net):
        logits = net(x).flatten(0, 1).float()
        return F.cross_entropy(logits, y.flatten())

    def hf_loss(net):
        return net(x, labels=y, shift_labels=y).loss

    print(f"matmul {peak / 1e12:.2f} TFLOP/s; {flops / 1e6:.1f} MFLOP per token")
    runs = [trainer(model, our_loss)]
    if hf is not None:
        hf.train()
        runs.append(trainer(hf, hf_loss))
    speed = [B * T * args.steps / t for t in best(*runs)]
    print(f"lima:         {speed[0]:8,.0f} tokens/s  MFU {speed[0] * flops / peak:5.1%}  "
          f"(batch {B} x {T})")
    if hf is not None:
        print(f"transformers: {speed[1]:8,.0f} tokens/s  MFU {speed[1] * flops / peak:5.1%}  "
              f"(lima {speed[0] / speed[1]:.2f}x)")
