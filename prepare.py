"""Dialogues, a JSON object a line as in GAIR/lima ({"conversations": [user, assistant, ...],
"source": ...}), to the token ids and loss masks train.py reads: OUT/train.pt, OUT/dev.pt and
OUT/tokenizer.model. With no flags, the tiny demo: data/sample.jsonl, with a small tokenizer trained
on it. For LLaMA:
    python prepare.py --input lima/train.jsonl --tokenizer llama/tokenizer.model --dev 50 \
        --out data/lima
--first N or --sample N keeps N dialogues of the input (a small run on a CPU) before --dev."""
import argparse
import hashlib
import io
import json
import os
import random
import shutil
import sys
from pathlib import Path

import sentencepiece as spm

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--input", default="data/sample.jsonl",
                    help="dialogues, a JSON object a line (default: %(default)s)")
parser.add_argument("--tokenizer",
                    help="SentencePiece model, e.g. LLaMA's (default: train one on the input)")
parser.add_argument("--out", default="data/prepared",
                    help="output directory; an earlier output is replaced (default: %(default)s)")
parser.add_argument("--max_len", type=int, default=2048,
                    help="trim dialogues to this many tokens (LIMA §3) (default: %(default)s)")
parser.add_argument("--dev", type=int, default=5,
                    help="dialogues held out for train.py's dev loss (default: %(default)s)")
parser.add_argument("--seed", type=int, default=1337,
                    help="seed of the dev set's choice and of --sample's (default: %(default)s)")
parser.add_argument("--first", type=int, metavar="N",
                    help="keep only the input's first N dialogues")
parser.add_argument("--sample", type=int, metavar="N",
                    help="keep N of the input's dialogues chosen by --seed, in the input's order")
parser.add_argument("--vocab_size", type=int, default=2000,
                    help="size of the tokenizer trained on the input (default: %(default)s)")
args = parser.parse_args()
src, out = Path(args.input), Path(os.path.normpath(args.out))  # "x/.." is "."

# -----------------------------------------------------------------------------
# check everything before writing anything: one line, no traceback, nothing written
try:
    if not src.exists():
        sys.exit(f"error: {src}: no such input file")
    data = src.read_bytes()
except OSError as e:  # a directory, or no permission to read it or to look in its directory
    sys.exit(f"error: {src}: cannot read it ({e.strerror})")
if args.max_len < 2:
    sys.exit(f"error: --max_len {args.max_len}: expected at least 2 (BOS and one token)")
if args.first is not None and args.sample is not None:
    sys.exit("error: --first and --sample: expected one of them, not both")
for flag, n in (("--first", args.first), ("--sample", args.sample)):
    if n is not None and n < 1:
        sys.exit(f"error: {flag} {n}: expected >= 1")
where = out.resolve()  # OUT is replaced: never the directory we are in, nor where the input is
if Path.cwd().is_relative_to(where):
    sys.exit(f"error: --out {out}: the current directory or one above it; not replacing it")
if src.resolve().is_relative_to(where):
    sys.exit(f"error: --out {out}: is or holds the input {src}; not replacing it")
ours = {"train.pt", "dev.pt", "tokenizer.model"}
try:
    theirs = out.exists() and not (out.is_dir() and set(os.listdir(out)) <= ours)
except OSError as e:  # no permission to list it or to look in its directory
    sys.exit(f"error: --out {out}: cannot read it ({e.strerror})")
if theirs:
    sys.exit(f"error: {out}: not an earlier prepare.py output (train.pt, dev.pt, "
             "tokenizer.model); not replacing it")
if args.tokenizer:
    try:
        tokenizer_model = Path(args.tokenizer).read_bytes()  # copied into OUT
        spm.SentencePieceProcessor(model_proto=tokenizer_model)
    except (OSError, RuntimeError):
        sys.exit(f"error: {args.tokenizer}: no such file or not a SentencePiece model (like "
                 "LLaMA's)")


def read_dialogue(where: str, line: bytes) -> tuple:
    """(turns, source) of one line, or one line of error naming where it is."""
    try:
        row = json.loads(line)  # from bytes: bad UTF-8 is reported with its line too
    except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, nesting too deep
        sys.exit(f"error: {where}: invalid JSON ({e})")
    if not isinstance(row, dict) or "conversations" not in row:
        sys.exit(f'error: {where}: expected a JSON object with a "conversations" list')
    turns, source = row["conversations"], row.get("source", "")
    if not isinstance(turns, list):
        sys.exit(f'error: {where}: "conversations" is a {type(turns).__name__}, expected a list '
                 "of strings")
    for i, turn in enumerate(turns, 1):
        # a lone surrogate (a "\ud800" escape) is no text a tokenizer takes
        if not isinstance(turn, str) or not turn.strip() or any(
                "\ud800" <= c <= "\udfff" for c in turn):
            sys.exit(f"error: {where}: turn {i} is {json.dumps(turn)[:40]}, expected non-empty "
                     "text (valid Unicode)")
    if len(turns) < 2 or len(turns) % 2:  # LIMA §2: turns alternate, user first; answers train
        if len(turns) == 1:
            why = "a lone prompt (a test example), nothing to train on"
        else:
            why = f"{len(turns)} turns"
        sys.exit(f"error: {where}: {why}; expected user/assistant turns ending with an answer "
                 "(an even number, at least 2)")
    if not isinstance(source, str):
        sys.exit(f'error: {where}: "source" is a {type(source).__name__}, expected a string')
    return turns, source


conversations, sources = [], []
for n, line in enumerate(data.split(b"\n"), 1):
    if line.strip():
        turns, source = read_dialogue(f"{src}:{n}", line)
        conversations.append(turns)
        sources.append(source)
if not conversations:
    sys.exit(f"error: {src}:1: empty file, expected one JSON object a line")
rng, total, kept = random.Random(args.seed), len(conversations), ""  # --sample's, then --dev's
if size := args.first or args.sample:  # a smaller run: some of the dialogues, in the input's order
    flag = "--first" if args.first else "--sample"
    if size > total:
        sys.exit(f"error: {flag} {size}: expected at most {total:,}, the dialogues in {src}")
    keep = range(size) if args.first else sorted(rng.sample(range(total), size))
    conversations, sources = [conversations[k] for k in keep], [sources[k] for k in keep]
    kept = (f" (the first {size:,} of its {total:,})" if args.first else
            f" ({size:,} of its {total:,}, chosen by --seed {args.seed})")
N = len(conversations)
if not 0 <= args.dev < N:
    sys.exit(f"error: --dev {args.dev}: expected 0 to {N - 1}, leaving one of {N} dialogues to "
             "train on")

# -----------------------------------------------------------------------------
# Without --tokenizer (the tiny demo), a small BPE model like LLaMA's: byte fallback (any text
# encodes), digits split, whitespace kept (code indentation), the same special ids; one thread:
# the same input gives the same file
if not args.tokenizer:
    buffer = io.BytesIO()
    sentences = (s for turns in conversations for t in turns for s in t.split("\n") if s.strip())
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences, model_writer=buffer, model_type="bpe",
            vocab_size=args.vocab_size, hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2,
            pad_id=-1, byte_fallback=True, split_digits=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
            max_sentence_length=1 << 16, num_threads=1, minloglevel=2)
    except RuntimeError as e:  # e.g. fewer pieces than the input has distinct characters
        sys.exit(f"error: --vocab_size {args.vocab_size}: cannot train a tokenizer on {src} ({e})")
    tokenizer_model = buffer.getvalue()

# -----------------------------------------------------------------------------
# encode and write into a temporary directory beside OUT, then rename it into place
import torch  # noqa: E402 (torch takes seconds to load: only once the input is known to be good)

from model import Tokenizer  # noqa: E402

tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
try:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    (tmp / "tokenizer.model").write_bytes(tokenizer_model)
    tokenizer = Tokenizer(tmp / "tokenizer.model")
    # BOS, each turn then EOT, the mask on the assistant's tokens and their EOT; trimmed (LIMA §3)
    encoded = [tokenizer.encode_dialogue(turns) for turns in conversations]
    ids = [torch.tensor(i[: args.max_len]) for i, _ in encoded]
    mask = [torch.tensor(m[: args.max_len]) for _, m in encoded]
    columns = {"ids": ids, "mask": mask, "conversations": conversations, "source": sources}
    dev = set(rng.sample(range(N), args.dev))
    made_by = {"eot_id": tokenizer.eot_id, "n_words": tokenizer.n_words, "max_len": args.max_len,
               "tokenizer_sha256": hashlib.sha256(tokenizer_model).hexdigest()}  # train.py checks
    splits = {"train": [k for k in range(N) if k not in dev], "dev": sorted(dev)}
    for name, rows in splits.items():
        split = {key: [column[k] for k in rows] for key, column in columns.items()}
        torch.save({**split, **made_by}, tmp / f"{name}.pt")
    shutil.rmtree(out, ignore_errors=True)  # an earlier output (checked above), replaced now
    tmp.rename(out)
except (OSError, RuntimeError) as e:  # unwritable or full; torch.save says RuntimeError
    sys.exit(f"error: --out {out}: cannot write it ({e})")
finally:
    shutil.rmtree(tmp, ignore_errors=True)  # gone already unless something failed

# -----------------------------------------------------------------------------
# what was written
lengths = sorted(len(i) for i, _ in encoded)  # before trimming
n_trimmed = sum(n > args.max_len for n in lengths)
n_supervised = sum(int(m.sum()) for m in mask)
percentiles = ", ".join(f"p{q} {lengths[N * q // 100]:,}" for q in (50, 90, 99))
print(f"wrote {out}/: {N:,} dialogues ({N - len(dev):,} train, {len(dev):,} dev), "
      f"{sum(map(len, conversations)):,} turns, from {src}{kept}")
print(f"tokenizer: {args.tokenizer or f'trained on {src}'}, {tokenizer.eot_id:,} pieces + EOT "
      f"(id {tokenizer.eot_id:,})")
print(f"tokens: {sum(lengths):,} before trimming; {n_trimmed:,} dialogues trimmed at "
      f"{args.max_len:,}, leaving {sum(map(len, ids)):,} tokens, of which {n_supervised:,} "
      "supervised")
print(f"tokens per dialogue before trimming: {percentiles}, max {lengths[-1]:,}")
if unsupervised := sum(not m.any() for m in mask):
    print(f"warning: {unsupervised:,} dialogues keep no assistant token within --max_len "
          f"{args.max_len:,}")
