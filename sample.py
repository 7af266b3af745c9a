"""
Talk to a LIMA model with the decoding LIMA was evaluated with (LIMA §2): nucleus sampling p = 0.9, temperature
0.7, a repetition penalty of 1.2 on previously generated tokens, at most 2,048 tokens; an answer ends at EOT.

$ python sample.py "Plan a three-day trip to Kyoto."            # newest out/epoch_*, the answer streams to stdout
$ python sample.py --chat --ckpt out/epoch_07                   # multi-turn, the history kept in the KV cache
$ python sample.py --prompts test.jsonl --output answers.jsonl  # a file of prompts, decoded in batches, resumable
"""
import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

# flags are checked before torch loads, so --help and a bad value answer at once
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("prompt", nargs="?", help="one prompt; its answer streams to stdout")
parser.add_argument("--ckpt", help="checkpoint directory, Meta or Hugging Face layout (default: newest out/epoch_*)")
parser.add_argument("--tokenizer", help="SentencePiece model (default: CKPT/tokenizer.model)")
parser.add_argument("--temperature", type=float, default=0.7, help="softmax temperature, LIMA: %(default)s; 0 is greedy")
parser.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling: draw from the smallest set of tokens "
                    "whose probability reaches top_p, LIMA: %(default)s")
parser.add_argument("--repetition_penalty", type=float, default=1.2, help="applies to the tokens already generated "
                    "in this answer (LIMA's 'previously generated tokens'; the prompt is not penalised): their "
                    "positive logits are divided by it and their negative logits multiplied by it; LIMA: %(default)s, "
                    "1 turns it off")
parser.add_argument("--max_new_tokens", type=int, default=2048, help="longest answer, LIMA: %(default)s; never past the context")
parser.add_argument("--seed", type=int, help="random seed, for reproducible answers")
parser.add_argument("--chat", action="store_true", help="interactive multi-turn chat; Ctrl-D or Ctrl-C leaves")
parser.add_argument("--prompts", help="answer each prompt of a text file (one per line) or of a jsonl file "
                    "(the first turn of 'conversations', e.g. GAIR/lima's test set)")
parser.add_argument("--output", help="jsonl for --prompts' answers; a rerun skips the prompts already in it")
parser.add_argument("--batch_size", type=int, default=8, help="prompts decoded together (default: %(default)s)")
parser.add_argument("--compile", action="store_true", help="compile the decode step with torch.compile (a "
                    "CUDA graph on a GPU): a faster step after tens of seconds of compiling on a CPU")
args = parser.parse_args()
if (args.prompt is not None) + args.chat + (args.prompts is not None) != 1:
    parser.error("give exactly one of: a PROMPT, --chat, --prompts FILE")
if (args.prompts is None) != (args.output is None):
    parser.error("--prompts FILE and --output FILE.jsonl go together")
for ok, flag, want in [(0 < args.top_p <= 1, "top_p", "in (0, 1]"), (args.temperature >= 0, "temperature", ">= 0"),
                       (args.repetition_penalty >= 1, "repetition_penalty", ">= 1 (1 is no penalty)"),
                       (args.max_new_tokens >= 1, "max_new_tokens", ">= 1"),
                       (args.batch_size >= 1, "batch_size", ">= 1")]:
    if not ok:
        sys.exit(f"error: --{flag} must be {want}, got {getattr(args, flag)}")

is_text = lambda s: re.search("[\ud800-\udfff]", s) is None  # not a lone surrogate (bad bytes, a JSON escape)
if args.prompt is not None and not is_text(args.prompt):
    sys.exit("error: the prompt is not valid UTF-8 text (a lone surrogate)")
if args.ckpt is None:  # the demo's most recently written epoch (a resumed run may rewrite an earlier one)
    epochs = [p for p in Path("out").glob("epoch_*") if p.name[6:].isdigit()]
    if not epochs:
        sys.exit("error: no checkpoint in out/: make one with `python prepare.py && python train.py --size tiny`, "
                 "or pass --ckpt DIR")
    args.ckpt = max(epochs, key=lambda p: p.stat().st_mtime)
    print(f"loading {args.ckpt}, the most recently written out/epoch_*", file=sys.stderr)
ckpt = Path(args.ckpt)
if not ckpt.is_dir():
    sys.exit(f"error: --ckpt {ckpt}: no such directory")
tok_path = Path(args.tokenizer or ckpt / "tokenizer.model")
if not tok_path.is_file():
    sys.exit(f"error: --tokenizer {tok_path}: no such file" if args.tokenizer else
             f"error: {tok_path} not found (a base LLaMA directory has none): pass --tokenizer FILE")

if args.prompts:
    src, out = Path(args.prompts), Path(args.output)
    if not src.is_file():
        sys.exit(f"error: --prompts {src}: no such file")
    if not out.parent.is_dir():
        sys.exit(f"error: --output {out}: no directory {out.parent}")

    def read_lines(path):
        try:
            return path.read_text(encoding="utf-8").splitlines() if path.exists() else []
        except UnicodeDecodeError as e:
            sys.exit(f"error: {path}: not UTF-8 text ({e.reason} at byte {e.start})")

    prompts = []  # (line number, prompt)
    for n, line in enumerate(read_lines(src), 1):
        prompt = line.strip()
        if prompt and src.suffix == ".jsonl":
            try:
                prompt = json.loads(line)["conversations"][0]
            except (ValueError, KeyError, IndexError, TypeError, RecursionError):
                prompt = None
            if not isinstance(prompt, str):
                sys.exit(f'error: {src}:{n}: expected a JSON object whose "conversations" list starts with the prompt')
            if not is_text(prompt):
                sys.exit(f"error: {src}:{n}: the prompt is not valid UTF-8 text (a lone surrogate)")
        if prompt:
            prompts.append((n, prompt))
    try:  # a directory or a file we may not write: refused now, not after the model loads
        open(out, "a").close()
    except OSError as e:
        sys.exit(f"error: --output {out}: cannot write to it ({e.strerror})")
    done = Counter()  # resume: prompts already answered in --output
    for n, line in enumerate(read_lines(out), 1):
        try:
            done[json.loads(line)["prompt"]] += 1
        except (ValueError, KeyError, TypeError, RecursionError):
            sys.exit(f'error: {out}:{n}: not an answer line (JSON with "prompt"); remove it to resume')
    todo = []
    for n, prompt in prompts:
        done[prompt] -= 1  # each answer in --output accounts for one occurrence of its prompt
        if done[prompt] < 0:
            todo.append((n, prompt))

import torch
from tqdm import tqdm

from model import CheckpointError, Tokenizer, Transformer, generate

device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
dtype = torch.float32 if device == "cpu" else torch.bfloat16
if args.seed is not None:
    torch.manual_seed(args.seed)
try:
    tok = Tokenizer(tok_path)
except (OSError, RuntimeError) as e:
    sys.exit(f"error: {tok_path}: not a SentencePiece model ({e})")
try:
    model = Transformer.from_pretrained(ckpt, vocab_size=tok.n_words, dtype=dtype)  # a base LLaMA gains EOT
except CheckpointError as e:
    sys.exit(f"error: {e}")
model = model.to(device).eval()
if not all(torch.isfinite(w).all() for w in model.parameters()):
    sys.exit(f"error: {ckpt}: the weights hold NaN or inf (saved from a diverged run?)")
if device == "cpu":  # MKL's matrix-vector products read a weight stored transposed up to 3x faster (bench.py)
    for m in filter(lambda m: isinstance(m, torch.nn.Linear), model.modules()):
        m.weight.data = m.weight.data.t().contiguous().t()  # the same values, shape and name
context = model.args.max_seq_len


def stream(ids, start_pos=0):
    """Print the answer to ids as it comes (positions < start_pos are cached); return it, EOT last unless cut off."""
    answer, shown = [], ""
    for t in generate(model, [ids[start_pos:]], tok.eot_id, args.max_new_tokens, args.temperature, args.top_p,
                      args.repetition_penalty, start_pos=start_pos, compile=args.compile):
        if t.item() < 0:  # the answer has ended
            break
        answer.append(t.item())
        text = tok.decode(answer)  # the whole answer: SentencePiece spacing depends on the neighbouring pieces
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            print(text[len(shown):], end="", flush=True)
            shown = text
    print(tok.decode(answer)[len(shown):], flush=True)  # whatever was held back, and the newline
    return answer


try:
    if args.prompt is not None:
        ids, _ = tok.encode_dialogue([args.prompt])  # BOS, prompt, EOT: the answer is the next turn
        if len(ids) >= context:
            sys.exit(f"error: the prompt is {len(ids)} tokens; the model's context is {context}")
        stream(ids)
    elif args.chat:
        room = min(args.max_new_tokens, context // 2)  # kept free for each answer; the oldest turns make way
        turns, cached = [], 0  # each utterance's tokens with its EOT; the cache holds the dialogue's first `cached`
        model.setup_cache(1, context)
        sys.stdin.reconfigure(errors="surrogateescape")  # bad bytes become lone surrogates, refused below
        while True:
            line = input("> ")  # Ctrl-D raises EOFError: the chat ends below
            if not is_text(line):
                print("error: that message is not valid UTF-8 text", file=sys.stderr)
                continue
            turns.append(tok.encode(line) + [tok.eot_id])
            while len(turns) > 1 and 1 + sum(map(len, turns)) + room > context:
                turns, cached = turns[2:], 0  # drop the oldest exchange; the rest is prefilled again
            ids = [tok.bos_id] + sum(turns, [])
            if len(ids) >= context:
                print(f"error: that message is {len(ids)} tokens; the model's context is {context}", file=sys.stderr)
                turns.pop()
                continue
            answer = stream(ids, cached)  # feeds only what the cache lacks: the new user turn
            cached = len(ids) + len(answer) - 1  # generate does not feed the last token it yields
            turns.append(answer if answer[-1] == tok.eot_id else answer + [tok.eot_id])
    else:
        batches = [tok.encode_dialogue([prompt])[0] for _, prompt in todo]
        for (n, _), ids in zip(todo, batches):
            if len(ids) >= context:
                sys.exit(f"error: {src}:{n}: the prompt is {len(ids)} tokens; the model's context is {context}")
        if len(todo) < len(prompts):
            print(f"{out}: {len(prompts) - len(todo)} prompts already answered, {len(todo)} to go", file=sys.stderr)
        with open(out, "a", encoding="utf-8") as f, tqdm(total=len(todo), unit="prompt") as bar:
            for b in range(0, len(todo), args.batch_size):
                steps = generate(model, batches[b : b + args.batch_size], tok.eot_id, args.max_new_tokens,
                                 args.temperature, args.top_p, args.repetition_penalty, compile=args.compile)
                rows = torch.stack(list(steps), 1).tolist()
                rows = [[t for t in row if t >= 0] for row in rows]  # -1: the answer has ended
                answers = [(row[: row.index(tok.eot_id)], True) if tok.eot_id in row else (row, False) for row in rows]
                f.write("".join(json.dumps({"prompt": p, "response": tok.decode(a), "tokens": len(a),
                                            "stopped_at_eot": s}, ensure_ascii=False) + "\n"
                                for (_, p), (a, s) in zip(todo[b : b + args.batch_size], answers)))
                f.flush()  # whole lines, batch by batch: an interrupted run keeps every finished answer
                bar.update(len(rows))
except (KeyboardInterrupt, EOFError) as e:  # Ctrl-C or Ctrl-D: no traceback (--output keeps the batches written)
    print(file=sys.stdout if isinstance(e, EOFError) else sys.stderr)
    sys.exit(0 if args.chat else 130)
