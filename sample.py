"""Talk to a LIMA model: answer a PROMPT as it streams, --chat with the history in the KV cache, or
answer a file of --prompts in batches, resumably. LIMA's decoding (LIMA §2): nucleus sampling
p = 0.9, temperature 0.7, a repetition penalty of 1.2 on previously generated tokens, at most 2,048
tokens, ending at EOT."""
import argparse
import fcntl
import hashlib
import json
import os
import sys
from collections import Counter
from pathlib import Path

# -----------------------------------------------------------------------------
# flags, checked before torch loads: --help and a bad value answer at once
parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
mode = parser.add_mutually_exclusive_group(required=True)
mode.add_argument("prompt", nargs="?", help="one prompt; its answer streams to stdout")
mode.add_argument("--chat", action="store_true", help="multi-turn chat; Ctrl-D or Ctrl-C leaves")
mode.add_argument("--prompts", type=Path,
                  help="a prompt a line, or a GAIR/lima jsonl (each first turn)")
parser.add_argument("--output", type=Path,
                    help="jsonl of --prompts' answers; a rerun skips those in it")
parser.add_argument("--ckpt", type=Path,
                    help="Meta or Hugging Face checkpoint (default: newest out/epoch_*)")
parser.add_argument("--tokenizer", type=Path,
                    help="SentencePiece model (default: CKPT/tokenizer.model)")
parser.add_argument("--temperature", type=float, default=0.7, help="LIMA: %(default)s; 0 is greedy")
parser.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling, LIMA: %(default)s")
parser.add_argument("--repetition_penalty", type=float, default=1.2,
                    help="applies to the tokens already generated in this answer, not the "
                    "prompt's: their positive logits are divided by it and their negative logits "
                    "multiplied by it; LIMA: %(default)s, 1 is off")
parser.add_argument("--max_new_tokens", type=int, default=2048,
                    help="longest answer, LIMA: %(default)s")
parser.add_argument("--seed", type=int,
                    help="an answer is a function of (checkpoint, prompt, seed, sampling flags)")
parser.add_argument("--batch_size", type=int, default=8,
                    help="prompts decoded at once (%(default)s)")
parser.add_argument("--compile", action="store_true",
                    help="compile the decode step (on CUDA: a CUDA graph)")
args = parser.parse_args()
if (args.prompts is None) != (args.output is None):
    parser.error("--prompts FILE and --output FILE.jsonl go together")
checks = [
    ("top_p", 0 < args.top_p <= 1, "in (0, 1]"),
    ("temperature", args.temperature >= 0, ">= 0"),
    ("repetition_penalty", args.repetition_penalty >= 1, ">= 1 (1 is no penalty)"),
    ("max_new_tokens", args.max_new_tokens >= 1, ">= 1"),
    ("batch_size", args.batch_size >= 1, ">= 1"),
]
for flag, ok, expected in checks:
    if not ok:
        sys.exit(f"error: --{flag} must be {expected}, got {getattr(args, flag)}")


def is_text(s: str) -> bool:
    """No lone surrogate: what bad bytes become, and no text a tokenizer takes."""
    return not any("\ud800" <= c <= "\udfff" for c in s)


if args.prompt is not None and not is_text(args.prompt):
    sys.exit("error: the prompt is not valid UTF-8 text (a lone surrogate)")
if args.ckpt is None:  # the most recently written epoch (a resumed run may rewrite an earlier one)
    epochs = [p for p in Path("out").glob("epoch_*") if p.name[6:].isdigit()]
    if not epochs:
        sys.exit("error: no checkpoint in out/: make one with `python prepare.py && python "
                 "train.py`, or pass --ckpt DIR")
    args.ckpt = max(epochs, key=lambda p: p.stat().st_mtime)
    print(f"loading {args.ckpt}, the most recently written out/epoch_*", file=sys.stderr)
if not args.ckpt.is_dir():
    sys.exit(f"error: --ckpt {args.ckpt}: no such directory")
tokenizer_file = args.tokenizer or args.ckpt / "tokenizer.model"
if args.tokenizer and not tokenizer_file.is_file():
    sys.exit(f"error: --tokenizer {tokenizer_file}: no such file")
if not tokenizer_file.is_file():
    sys.exit(f"error: {tokenizer_file} not found (a base LLaMA directory has none): pass "
             "--tokenizer FILE")


# -----------------------------------------------------------------------------
# --prompts: what is left to answer

def first_turn(line: str):
    """The prompt of a GAIR/lima line: the first turn of its "conversations" list, else None."""
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(row, dict) or not isinstance(row.get("conversations"), list):
        return None
    turns = row["conversations"]
    if not turns or not isinstance(turns[0], str):
        return None
    return turns[0]


def read_prompts(src: Path) -> list:
    """(where, prompt) for each non-empty line: the line's text, or in GAIR/lima's jsonl the first
    turn of its "conversations". A file is that jsonl when it is named .jsonl or its first line
    is a JSON object, whatever its name; then every line must be one."""
    if not src.is_file():
        sys.exit(f"error: --prompts {src}: no such file")
    try:
        text = src.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        sys.exit(f"error: {src}: not UTF-8 text ({e.reason} at byte {e.start})")
    except OSError as e:
        sys.exit(f"error: --prompts {src}: cannot read it ({e.strerror})")
    lines = text.split("\n")  # not splitlines: U+2028 is no line break here
    first = next((line.strip() for line in lines if line.strip()), "")
    is_jsonl = src.suffix == ".jsonl" or (first.startswith("{") and first_turn(first) is not None)
    prompts = []
    for n, line in enumerate(lines, 1):
        prompt = line.strip()
        if prompt and is_jsonl:
            prompt = first_turn(line)
            if prompt is None:
                sys.exit(f'error: {src}:{n}: expected a JSON object whose "conversations" list '
                         "starts with the prompt")
            if not is_text(prompt):
                sys.exit(f"error: {src}:{n}: the prompt is not valid UTF-8 text (a lone surrogate)")
        if prompt:
            prompts.append((f"{src}:{n}: ", prompt))
    return prompts


def claim_output(output: Path):
    """--output opened for appending and locked while this run lives: one writer a file. A tail
    without its newline (a write cut short) is dropped: each line ends where a batch's write did."""
    try:  # a directory or a file we may not write: refused now, not after the model loads
        f = open(output, "ab", buffering=0)  # unbuffered: a failed write is undone below, whole
    except OSError as e:
        sys.exit(f"error: --output {output}: cannot write to it ({e.strerror})")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.exit(f"error: --output {output}: another sample.py is writing there; wait for it or "
                 "give another --output")
    text = output.read_bytes()
    if text and not text.endswith(b"\n"):
        whole = text.rfind(b"\n") + 1
        print(f"{output}: dropping a cut-short last line ({len(text) - whole} bytes)",
              file=sys.stderr)
        f.truncate(whole)
    return f


def unanswered(prompts: list, output: Path) -> list:
    """The prompts --output does not answer yet: each answer there accounts for one occurrence of
    its prompt, so a prompt asked twice is answered twice."""
    answered = Counter()
    # bytes: an answer's U+2028 is no line break
    for n, line in enumerate(output.read_bytes().splitlines(), 1):
        try:
            answered[json.loads(line)["prompt"]] += 1
        except (ValueError, KeyError, TypeError, RecursionError):  # bad UTF-8 too
            sys.exit(f'error: {output}:{n}: not an answer line (JSON with "prompt"); remove it to '
                     "resume")
    todo = []
    for where, prompt in prompts:
        answered[prompt] -= 1
        if answered[prompt] < 0:
            todo.append((where, prompt))
    return todo


todo = [("", args.prompt)]  # (where it comes from, prompt)
if args.prompts:
    prompts = read_prompts(args.prompts)
    output_file = claim_output(args.output)
    todo = unanswered(prompts, args.output)
    print(f"{args.output}: {len(prompts) - len(todo)} prompts already answered, {len(todo)} to go",
          file=sys.stderr)
elif args.chat:
    todo = []

# -----------------------------------------------------------------------------
# the model
import torch  # noqa: E402 (seconds to load: only once the flags and files are known to be good)
from tqdm import tqdm  # noqa: E402

from checkpoint import CheckpointError, load_model  # noqa: E402
from model import Tokenizer, generate  # noqa: E402

if torch.cuda.is_available():
    device = "cuda"
elif torch.backends.mps.is_available():
    device = "mps"
else:
    device = "cpu"
if args.compile and device == "cpu":  # the weights never change here: inductor folds them in
    import torch._inductor.config  # a second of imports: only when compiling
    torch._inductor.config.freezing = True
try:
    tokenizer = Tokenizer(tokenizer_file)
except (OSError, RuntimeError) as e:
    sys.exit(f"error: {tokenizer_file}: not a SentencePiece model ({e})")
dtype = torch.float32 if device == "cpu" else torch.bfloat16
try:  # a base LLaMA gains EOT
    model = load_model(args.ckpt, vocab_size=tokenizer.n_words, dtype=dtype)
except CheckpointError as e:
    sys.exit(f"error: {e}")
model = model.to(device).eval()
if not all(torch.isfinite(w).all() for w in model.parameters()):
    sys.exit(f"error: {args.ckpt}: the weights hold NaN or inf (saved from a diverged run?)")
if device == "cpu":  # MKL's matrix-vector products read a weight stored transposed up to 3x faster
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):  # the same values, shape and name (bench.py)
            module.weight.data = module.weight.data.t().contiguous().t()
context = model.args.max_seq_len
encoded = [tokenizer.encode_dialogue([prompt])[0] for _, prompt in todo]  # BOS, prompt, EOT
for (where, _), ids in zip(todo, encoded):
    if len(ids) >= context:
        sys.exit(f"error: {where}the prompt is {len(ids)} tokens; the model's context is {context}")
sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                compile=args.compile)


# -----------------------------------------------------------------------------
# talk

def generators(prompts: list):
    """With --seed, a generator for each prompt seeded by (seed, prompt): its answer is the same in
    any batch, at any place in the file, resumed or not. Without, the global one."""
    if args.seed is None:
        return None
    seeded = []
    for prompt in prompts:
        digest = hashlib.sha256(f"{args.seed}\n{prompt}".encode("utf-8", "surrogatepass")).digest()
        seed = int.from_bytes(digest[:8], "little") >> 1  # manual_seed takes a signed 64-bit int
        seeded.append(torch.Generator(device).manual_seed(seed))
    return seeded


def read_messages():
    """The chat's messages as typed, until Ctrl-D."""
    sys.stdin.reconfigure(errors="surrogateescape")  # bad bytes become lone surrogates
    while True:
        try:
            yield input("> ")
        except EOFError:
            print()
            return


def chat(messages):
    """Answer each message in turn, streaming, the history kept in the KV cache. The oldest
    exchanges make way when a new answer would not fit."""
    room = min(args.max_new_tokens, context // 2)  # kept free for each answer
    turns = []  # each utterance's tokens and EOT
    cached = 0  # the cache holds the first `cached` tokens of BOS + turns
    cache = model.make_cache(1, context)
    for message in messages:
        if not is_text(message):
            print("error: that message is not valid UTF-8 text", file=sys.stderr)
            continue
        turn = tokenizer.encode(message) + [tokenizer.eot_id]
        if 1 + len(turn) >= context:  # refused before it trims the history, which stays
            print(f"error: that message is {1 + len(turn)} tokens; the model's context is "
                  f"{context}", file=sys.stderr)
            continue
        turns.append(turn)
        while len(turns) > 1 and 1 + sum(map(len, turns)) + room > context:
            turns = turns[2:]  # drop the oldest exchange; the rest is prefilled again
            cached = 0
        ids = [tokenizer.bos_id] + sum(turns, [])
        answer = stream_answer(ids[cached:], cache, cached, message)  # fed what it lacks
        cached = len(ids) + len(answer) - 1  # generate does not feed the last token it yields
        if answer[-1] != tokenizer.eot_id:
            answer = answer + [tokenizer.eot_id]
        turns.append(answer)


def stream_answer(ids: list, cache: dict, start_pos: int, message: str) -> list:
    """Print the answer to ids as it is decoded; returns its tokens (EOT included if reached)."""
    answer, shown = [], ""
    for tokens in generate(model, [ids], tokenizer.eot_id, cache=cache, start_pos=start_pos,
                           generator=generators([message]), **sampling):
        token = tokens.item()
        if token < 0:  # the answer has ended
            break
        answer.append(token)
        text = tokenizer.decode(answer).rstrip("\ufffd")  # whole (for spacing), less a part char
        print(text[len(shown):], end="", flush=True)
        shown = text
    print(tokenizer.decode(answer)[len(shown):], flush=True)  # what was held back, and a newline
    return answer


def decode_batch(prompt_ids: list, texts: list, bar) -> list:
    """Rows of tokens (-1 once an answer has ended) for a batch of prompts, given as ids and as
    text; the bar moves as answers end, read every 16 steps (a host read stalls a GPU's queue)."""
    columns, n_ended = [], 0
    ended = torch.zeros(len(prompt_ids), dtype=torch.bool, device=device)
    steps = generate(model, prompt_ids, tokenizer.eot_id, generator=generators(texts), **sampling)
    for k, tokens in enumerate(steps):
        columns.append(tokens)
        ended |= (tokens == -1) | (tokens == tokenizer.eot_id)
        if k % 16 == 15:  # one host read
            n_now = int(ended.sum())
            bar.update(n_now - n_ended)
            n_ended = n_now
    bar.update(len(prompt_ids) - n_ended)
    return torch.stack(columns, 1).tolist()


def answer_file(f):
    """Answer the prompts left in batches, appending a batch's lines in one write: an interrupted
    run keeps every finished answer, and a failed write (a full disk) is undone."""
    with tqdm(total=len(todo), unit="prompt") as bar:
        for b in range(0, len(todo), args.batch_size):
            batch = todo[b : b + args.batch_size]
            texts = [prompt for _, prompt in batch]
            rows = decode_batch(encoded[b : b + args.batch_size], texts, bar)
            lines = []
            for (_, prompt), row in zip(batch, rows):
                answer = [t for t in row if t not in (-1, tokenizer.eot_id)]
                line = {"prompt": prompt, "response": tokenizer.decode(answer),
                        "tokens": len(answer), "stopped_at_eot": tokenizer.eot_id in row}
                lines.append(json.dumps(line, ensure_ascii=False) + "\n")
            size = f.seek(0, os.SEEK_END)
            data = "".join(lines).encode()
            try:
                written = 0
                while written < len(data):  # an unbuffered write may take part of it
                    written += f.write(data[written:])
            except OSError as e:
                f.truncate(size)  # what was written stays whole: the rerun continues from it
                sys.exit(f"error: --output {args.output}: cannot write to it ({e.strerror}); "
                         "rerun to continue")


try:
    if args.prompts:
        answer_file(output_file)
    elif args.chat:
        chat(read_messages())
    else:  # one prompt is a chat of one message
        chat([args.prompt])
except KeyboardInterrupt:  # Ctrl-C: no traceback (--output keeps what it holds)
    print(file=sys.stderr)
    sys.exit(0 if args.chat else 130)
