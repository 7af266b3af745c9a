"""Talk to a LIMA model: answer a PROMPT as it streams, --chat with the history in the KV cache, or answer
a file of --prompts in batches, resumably. LIMA's decoding (LIMA §2): nucleus sampling p = 0.9, temperature
0.7, a repetition penalty of 1.2 on previously generated tokens, at most 2,048 tokens, ending at EOT."""
import argparse
import json
import sys
from collections import Counter
from pathlib import Path

# flags are checked before torch loads, so --help and a bad value answer at once
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
mode = parser.add_mutually_exclusive_group(required=True)
mode.add_argument("prompt", nargs="?", help="one prompt; its answer streams to stdout")
mode.add_argument("--chat", action="store_true", help="multi-turn chat; Ctrl-D or Ctrl-C leaves")
mode.add_argument("--prompts", type=Path, help="a prompt a line, or a GAIR/lima jsonl (each first turn)")
parser.add_argument("--output", type=Path, help="jsonl of --prompts' answers; a rerun skips those in it")
parser.add_argument("--ckpt", type=Path, help="Meta or Hugging Face checkpoint (default: newest out/epoch_*)")
parser.add_argument("--tokenizer", type=Path, help="SentencePiece model (default: CKPT/tokenizer.model)")
parser.add_argument("--temperature", type=float, default=0.7, help="LIMA: %(default)s; 0 is greedy")
parser.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling, LIMA: %(default)s")
parser.add_argument("--repetition_penalty", type=float, default=1.2, help="applies to the tokens already "
                    "generated in this answer, not the prompt's: their positive logits are divided by it and "
                    "their negative logits multiplied by it; LIMA: %(default)s, 1 is off")
parser.add_argument("--max_new_tokens", type=int, default=2048, help="longest answer, LIMA: %(default)s")
parser.add_argument("--seed", type=int, help="random seed, for reproducible answers")
parser.add_argument("--batch_size", type=int, default=8, help="prompts decoded at once (%(default)s)")
parser.add_argument("--compile", action="store_true", help="compile the decode step (on CUDA: a CUDA graph)")
args = parser.parse_args()
if (args.prompts is None) != (args.output is None):
    parser.error("--prompts FILE and --output FILE.jsonl go together")
checks = {"top_p": (0 < args.top_p <= 1, "in (0, 1]"), "temperature": (args.temperature >= 0, ">= 0"),
          "repetition_penalty": (args.repetition_penalty >= 1, ">= 1 (1 is no penalty)"),
          "max_new_tokens": (args.max_new_tokens >= 1, ">= 1"), "batch_size": (args.batch_size >= 1, ">= 1")}
for flag, (ok, want) in checks.items():
    if not ok:
        sys.exit(f"error: --{flag} must be {want}, got {getattr(args, flag)}")

is_text = lambda s: not any("\ud800" <= c <= "\udfff" for c in s)  # no lone surrogate (bad bytes)
if args.prompt is not None and not is_text(args.prompt):
    sys.exit("error: the prompt is not valid UTF-8 text (a lone surrogate)")
if args.ckpt is None:  # the most recently written epoch (a resumed run may rewrite an earlier one)
    epochs = [p for p in Path("out").glob("epoch_*") if p.name[6:].isdigit()]
    if not epochs:
        sys.exit("error: no checkpoint in out/: make one with `python prepare.py && python train.py --size "
                 "tiny`, or pass --ckpt DIR")
    args.ckpt = max(epochs, key=lambda p: p.stat().st_mtime)
    print(f"loading {args.ckpt}, the most recently written out/epoch_*", file=sys.stderr)
if not args.ckpt.is_dir():
    sys.exit(f"error: --ckpt {args.ckpt}: no such directory")
tok_path = args.tokenizer or args.ckpt / "tokenizer.model"
if not tok_path.is_file():
    sys.exit(f"error: --tokenizer {tok_path}: no such file" if args.tokenizer else
             f"error: {tok_path} not found (a base LLaMA directory has none): pass --tokenizer FILE")

todo = [] if args.prompt is None else [("", args.prompt)]  # (where it comes from, prompt)
if args.prompts:
    src, out = args.prompts, args.output
    if not src.is_file():
        sys.exit(f"error: --prompts {src}: no such file")
    try:
        lines = src.read_text(encoding="utf-8").split("\n")  # not splitlines: U+2028 is no line break here
    except UnicodeDecodeError as e:
        sys.exit(f"error: {src}: not UTF-8 text ({e.reason} at byte {e.start})")
    prompts = []
    for n, line in enumerate(lines, 1):
        prompt = line.strip()
        if prompt and src.suffix == ".jsonl":
            try:
                prompt = json.loads(line)["conversations"][0]
            except (ValueError, LookupError, TypeError, RecursionError):
                prompt = None
            if not isinstance(prompt, str):
                sys.exit(f'error: {src}:{n}: expected a JSON object whose "conversations" list starts with '
                         "the prompt")
            if not is_text(prompt):
                sys.exit(f"error: {src}:{n}: the prompt is not valid UTF-8 text (a lone surrogate)")
        if prompt:
            prompts.append((f"{src}:{n}: ", prompt))
    try:  # a directory or a file we may not write: refused now, not after the model loads
        open(out, "a").close()
    except OSError as e:
        sys.exit(f"error: --output {out}: cannot write to it ({e.strerror})")
    answered = Counter()  # resume: each answer in --output accounts for one occurrence of its prompt
    for n, line in enumerate(out.read_bytes().splitlines(), 1):  # bytes: an answer's U+2028 is no line break
        try:
            answered[json.loads(line)["prompt"]] += 1
        except (ValueError, KeyError, TypeError, RecursionError):  # bad UTF-8 too
            sys.exit(f'error: {out}:{n}: not an answer line (JSON with "prompt"); remove it to resume')
    for where, prompt in prompts:
        answered[prompt] -= 1
        if answered[prompt] < 0:
            todo.append((where, prompt))
    print(f"{out}: {len(prompts) - len(todo)} prompts already answered, {len(todo)} to go", file=sys.stderr)

import torch
from tqdm import tqdm

from checkpoint import CheckpointError, load_model
from model import Tokenizer, generate

device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
if args.compile and device == "cpu":  # the weights never change here: inductor folds them in, prepacked
    import torch._inductor.config  # a second of imports: only when compiling
    torch._inductor.config.freezing = True
if args.seed is not None:
    torch.manual_seed(args.seed)
try:
    tok = Tokenizer(tok_path)
except (OSError, RuntimeError) as e:
    sys.exit(f"error: {tok_path}: not a SentencePiece model ({e})")
try:  # a base LLaMA gains EOT
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = load_model(args.ckpt, vocab_size=tok.n_words, dtype=dtype).to(device).eval()
except CheckpointError as e:
    sys.exit(f"error: {e}")
if not all(torch.isfinite(w).all() for w in model.parameters()):
    sys.exit(f"error: {args.ckpt}: the weights hold NaN or inf (saved from a diverged run?)")
if device == "cpu":  # MKL's matrix-vector products read a weight stored transposed up to 3x faster (bench.py)
    for m in filter(lambda m: isinstance(m, torch.nn.Linear), model.modules()):
        m.weight.data = m.weight.data.t().contiguous().t()  # the same values, shape and name
context = model.args.max_seq_len
encoded = [tok.encode_dialogue([prompt])[0] for _, prompt in todo]  # BOS, prompt, EOT: the answer is next
for (where, _), ids in zip(todo, encoded):
    if len(ids) >= context:
        sys.exit(f"error: {where}the prompt is {len(ids)} tokens; the model's context is {context}")
sampling = {k: vars(args)[k] for k in "max_new_tokens temperature top_p repetition_penalty compile".split()}

try:
    if not args.prompts:  # one prompt is a chat of one message
        room = min(args.max_new_tokens, context // 2)  # kept free for each answer; the oldest turns make way
        turns, cached = [], 0  # each utterance's tokens and EOT; the cache holds the first `cached` of them
        cache = model.make_cache(1, context)
        sys.stdin.reconfigure(errors="surrogateescape")  # bad bytes become lone surrogates, refused below
        for line in [args.prompt] if args.prompt is not None else iter(lambda: input("> "), None):  # Ctrl-D
            if not is_text(line):
                print("error: that message is not valid UTF-8 text", file=sys.stderr)
                continue
            turns.append(tok.encode(line) + [tok.eot_id])
            if 1 + len(turns[-1]) >= context:  # refused before it trims the history, which stays
                n = 1 + len(turns.pop())
                print(f"error: that message is {n} tokens; the model's context is {context}", file=sys.stderr)
                continue
            while len(turns) > 1 and 1 + sum(map(len, turns)) + room > context:
                turns, cached = turns[2:], 0  # drop the oldest exchange; the rest is prefilled again
            ids = [tok.bos_id] + sum(turns, [])
            answer, shown = [], ""  # streamed; the cache is fed only what it lacks: the new user turn
            for t in generate(model, [ids[cached:]], tok.eot_id, cache=cache, start_pos=cached, **sampling):
                if t.item() < 0:  # the answer has ended
                    break
                answer.append(t.item())
                text = tok.decode(answer).rstrip("\ufffd")  # whole (for spacing), less a partial character
                print(text[len(shown):], end="", flush=True)
                shown = text
            print(tok.decode(answer)[len(shown):], flush=True)  # whatever was held back, and the newline
            cached = len(ids) + len(answer) - 1  # generate does not feed the last token it yields
            turns.append(answer if answer[-1] == tok.eot_id else answer + [tok.eot_id])
    else:
        with open(out, "a", encoding="utf-8") as f, tqdm(total=len(todo), unit="prompt") as bar:
            for b in range(0, len(todo), args.batch_size):
                steps = generate(model, encoded[b : b + args.batch_size], tok.eot_id, **sampling)
                rows = torch.stack(list(steps), 1).tolist()  # -1 once an answer has ended
                answers = [[t for t in row if t not in (-1, tok.eot_id)] for row in rows]
                f.write("".join(json.dumps({"prompt": p, "response": tok.decode(a), "tokens": len(a),
                                            "stopped_at_eot": tok.eot_id in row}, ensure_ascii=False) + "\n"
                                for (_, p), a, row in zip(todo[b : b + args.batch_size], answers, rows)))
                f.flush()  # whole lines, batch by batch: an interrupted run keeps every finished answer
                bar.update(len(rows))
except (KeyboardInterrupt, EOFError) as e:  # Ctrl-C or Ctrl-D: no traceback (--output keeps what it holds)
    print(file=sys.stdout if isinstance(e, EOFError) else sys.stderr)
    sys.exit(0 if args.chat else 130)
