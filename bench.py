"""
How fast this LLaMA decodes and trains on the device at hand, next to Hugging Face transformers'
LlamaForCausalLM of the same shape and weights (when installed), and how close both come to the device's
limit measured in the same run: read bandwidth for decoding (a step reads every weight), matmul FLOP/s for
training.

$ python bench.py decode                                   # the tiny shape, LLaMA's 32,001 tokens, batch 1
$ python bench.py decode --size 7B --dtype bfloat16        # on a GPU
$ python bench.py train --dim 512 --n_layers 8 --n_heads 8 --seq_len 512
"""
import argparse
import time

import torch
import torch.nn.functional as F

from checkpoint import hf_name
from model import ModelArgs, Transformer, generate

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("mode", choices=["decode", "train"])
p.add_argument("--size", default="tiny", help="tiny, 7B, 13B, 33B or 65B; the flags below change it")
for k in ("dim", "n_layers", "n_heads", "n_kv_heads"):
    p.add_argument(f"--{k}", type=int)
p.add_argument("--vocab_size", type=int, default=32001, help="LLaMA's 32,000 pieces and EOT")
p.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: bfloat16 on CUDA, else float32")
p.add_argument("--batch_size", type=int, default=1)
p.add_argument("--prompt_len", type=int, default=32, help="decode: prompt tokens per row")
p.add_argument("--new_tokens", type=int, default=256, help="decode: tokens generated per row")
p.add_argument("--compile", type=int, choices=[0, 1], help="decode: compile the step (default: on CUDA)")
p.add_argument("--row_major", action="store_true", help="decode: keep weights row-major on a CPU")
p.add_argument("--greedy", action="store_true", help="decode: argmax instead of LIMA's sampling")
p.add_argument("--seq_len", type=int, default=256, help="train: tokens per sequence")
p.add_argument("--steps", type=int, default=5, help="train: timed optimizer steps (after one warm-up)")
p.add_argument("--repeat", type=int, default=3, help="timed runs of each; the best is kept")
p.add_argument("--no_hf", action="store_true", help="skip transformers")
args = p.parse_args()

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
shape = {k: v for k in ("dim", "n_layers", "n_heads", "n_kv_heads") if (v := getattr(args, k)) is not None}
margs = ModelArgs.from_size(args.size, vocab_size=args.vocab_size, **shape)
name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
print(f"device: {name}; torch {torch.__version__}; {dtype}; dim {margs.dim}, {margs.n_layers} layers, "
      f"{margs.n_heads} heads, vocab {margs.vocab_size}")


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


def best(*fns, repeat=args.repeat):
    """The shortest of repeat timed calls of each fn, after one untimed (warm-up, compilation). The calls take
    turns, so that a machine shared with other work slows each alike."""
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


torch.manual_seed(0)
with torch.device(device):
    model = Transformer(margs).to(dtype)
if args.mode == "decode":
    # random weights give a flat next-token distribution, whose nucleus holds most of the vocabulary;
    # a trained model's is peaked (the top 64 tokens hold 90% at temperature 0.7): scale the output to match
    with torch.no_grad():
        model.output.weight.mul_(150)
    if device.type == "cpu" and not args.row_major:  # as sample.py does
        for m in filter(lambda m: isinstance(m, torch.nn.Linear), model.modules()):
            m.weight.data = m.weight.data.t().contiguous().t()

hf = None
if not args.no_hf:
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        print("transformers is not installed: this project's figures only")
    else:
        config = LlamaConfig(hidden_size=margs.dim, intermediate_size=margs.hidden_dim,
                             num_hidden_layers=margs.n_layers, num_attention_heads=margs.n_heads,
                             num_key_value_heads=margs.n_kv_heads or margs.n_heads,
                             vocab_size=margs.vocab_size,
                             max_position_embeddings=margs.max_seq_len, rms_norm_eps=margs.norm_eps,
                             rope_theta=margs.rope_theta, tie_word_embeddings=False)
        with torch.device(device):
            hf = LlamaForCausalLM(config).to(dtype)
        ours = {hf_name(k, to_hf=False): k for k in hf.state_dict()}  # the same weights (q/k rows in Meta's rotary order)
        hf.load_state_dict({ours[k]: v for k, v in model.state_dict().items()})
        hf.eval()
model.train(args.mode == "train")

if args.mode == "decode":
    # the bound: every weight but the embedding table (a lookup) is read once per step, at the read bandwidth
    # measured by summing a 1 GiB tensor (256 MiB on a CPU)
    big = torch.ones((2**28 if device.type == "cuda" else 2**26), device=device)
    bandwidth = big.numel() * 4 / best(lambda: big.sum(), repeat=10)[0]
    del big
    weights = sum(p.nbytes for name, p in model.named_parameters() if "tok_embeddings" not in name)
    bound = args.batch_size * bandwidth / weights
    B, n = args.batch_size, args.new_tokens
    prompts = torch.randint(3, margs.vocab_size, (B, args.prompt_len), device=device)
    sampling = dict(temperature=0, repetition_penalty=1.0) if args.greedy else {}  # LIMA's by default
    compile = args.compile if args.compile is not None else device.type == "cuda"
    if compile and device.type == "cpu":  # as sample.py does: weights folded in, prepacked for the GEMMs
        import torch._inductor.config
        torch._inductor.config.freezing = True

    def ours():
        steps = generate(model, prompts.tolist(), -2, n, compile=compile, **sampling)  # -2: never stops early
        assert sum(1 for _ in steps) == n
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s, {weights / 1e6:.1f} MB of weights read per step: "
          f"bound {bound:,.0f} tokens/s at batch {B}")
    kw = dict(do_sample=False, repetition_penalty=1.0) if args.greedy else dict(
        do_sample=True, temperature=0.7, top_p=0.9, top_k=None, repetition_penalty=1.2)
    gen = lambda: hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n,
                              min_new_tokens=n, eos_token_id=None, pad_token_id=0, **kw)
    with torch.no_grad():
        tps = [B * n / t for t in best(ours, *[gen] if hf else [])]
    print(f"lima:         {tps[0]:8,.0f} tokens/s  {tps[0] / bound:5.1%} of the bound  "
          f"(batch {B}, {args.prompt_len} prompt + {n} new tokens, {'compiled' if compile else 'eager'})")
    if hf is not None:
        print(f"transformers: {tps[1]:8,.0f} tokens/s  {tps[1] / bound:5.1%} of the bound  "
              f"(lima {tps[0] / tps[1]:.2f}x)")
else:
    # the bound: a large matmul's FLOP/s; a step's FLOPs are 6 per weight per token (forward, backward) plus
    # attention's 12 * layers * dim * seq_len per token (Chowdhery et al., 2022, appendix B)
    a = torch.randn(4096, 4096, device=device, dtype=dtype)
    peak = 2 * 4096**3 / best(lambda: a @ a, repeat=5)[0]
    del a
    B, T = args.batch_size, args.seq_len
    n = sum(p.numel() for k, p in model.named_parameters() if "tok_embeddings" not in k)
    flops = 6 * n + 12 * margs.n_layers * margs.dim * T
    x, y = torch.randint(0, margs.vocab_size, (2, B, T), device=device)  # inputs and their next tokens

    def trainer(net, loss_of):
        opt = torch.optim.AdamW(net.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1)

        def run():
            for _ in range(args.steps):
                loss_of(net).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        return run

    print(f"matmul {peak / 1e12:.2f} TFLOP/s; {flops / 1e6:.1f} MFLOP per token")
    runs = [trainer(model, lambda m: F.cross_entropy(m(x).flatten(0, 1).float(), y.flatten()))]
    if hf is not None:
        hf.train()
        runs.append(trainer(hf, lambda m: m(x, labels=y, shift_labels=y).loss))
    tps = [B * T * args.steps / t for t in best(*runs)]
    print(f"lima:         {tps[0]:8,.0f} tokens/s  MFU {tps[0] * flops / peak:5.1%}  (batch {B} x {T})")
    if hf is not None:
        print(f"transformers: {tps[1]:8,.0f} tokens/s  MFU {tps[1] * flops / peak:5.1%}  "
              f"(lima {tps[0] / tps[1]:.2f}x)")
