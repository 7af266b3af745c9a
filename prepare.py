"""
Turn dialogues in GAIR/lima's layout, one JSON object a line, {"conversations": [user, assistant, ...], "source": ...},
into the token ids and loss masks train.py reads: OUT/train.pt, OUT/dev.pt and OUT/tokenizer.model.

python prepare.py                       # the sample in data/, with a small tokenizer trained on it (the tiny demo)
python prepare.py --input ../lima/train.jsonl --tokenizer ../llama/tokenizer.model --dev 50  # LLaMA fine-tuning
"""
import argparse
import hashlib
import io
import json
import os
import random
import re
import shutil
import sys
from collections import Counter
from pathlib import Path

import sentencepiece as spm
from tqdm import tqdm

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--input", default="data/sample.jsonl", help="dialogues, one JSON object a line")
parser.add_argument("--tokenizer", help="SentencePiece model, e.g. LLaMA's (default: train a small one on the input)")
parser.add_argument("--out", default="data/prepared", help="output directory; an earlier output there is replaced")
parser.add_argument("--max_len", type=int, default=2048, help="trim each dialogue to this many tokens (LIMA §3)")
parser.add_argument("--dev", type=int, default=5, help="dialogues held out, for train.py's dev loss and samples "
                    "each epoch (LIMA chose checkpoints on 50; 5 suits the sample)")
parser.add_argument("--seed", type=int, default=1337, help="seed of the dev set's choice")
parser.add_argument("--vocab_size", type=int, default=2000, help="pieces of the tokenizer trained without --tokenizer")
args = parser.parse_args()
src, out = Path(args.input), Path(args.out)


def fail(message):  # one line, no traceback; nothing has been written yet, or only to a temporary directory
    sys.exit(f"error: {message}")


# -----------------------------------------------------------------------------
# check everything before writing anything

if not src.is_file():
    fail(f"{src}: no such input file")
if args.max_len < 2:
    fail(f"--max_len {args.max_len}: expected at least 2 (BOS and one token)")
if out.exists() and not (out.is_dir() and {p.name for p in out.iterdir()} <= {"train.pt", "dev.pt", "tokenizer.model"}):
    fail(f"{out}: exists and is not an earlier prepare.py output (train.pt, dev.pt, tokenizer.model); not replacing it")
if args.tokenizer:
    try:
        spm.SentencePieceProcessor(model_file=args.tokenizer)
        model = Path(args.tokenizer).read_bytes()  # copied into OUT
    except (OSError, RuntimeError):
        fail(f"{args.tokenizer}: no such file or not a SentencePiece model (expected e.g. LLaMA's tokenizer.model)")

conversations, sources = [], []
with open(src, "rb") as f:
    for n, line in enumerate(f, 1):
        where = f"{src}:{n}"
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, nesting too deep
            fail(f"{where}: invalid JSON ({e})")
        if not isinstance(row, dict) or "conversations" not in row:
            fail(f'{where}: expected a JSON object with a "conversations" list')
        turns, source = row["conversations"], row.get("source", "")
        if not isinstance(turns, list):
            fail(f'{where}: "conversations" is a {type(turns).__name__}, expected a list of strings')
        for i, turn in enumerate(turns, 1):
            # a lone surrogate (a "\ud800" escape) is no text: the tokenizer cannot encode it
            if not isinstance(turn, str) or not turn.strip() or re.search("[\ud800-\udfff]", turn):
                fail(f"{where}: turn {i} is {json.dumps(turn)[:40]}, expected non-empty text (valid Unicode)")
        if len(turns) < 2 or len(turns) % 2:  # LIMA §2: turns alternate, user first; training needs the answer
            why = "a lone prompt (a test example) has nothing to train on" if len(turns) == 1 else f"{len(turns)} turns"
            fail(f"{where}: {why}; expected user/assistant turns ending with an answer (an even number, at least 2)")
        if not isinstance(source, str):
            fail(f'{where}: "source" is a {type(source).__name__}, expected a string')
        conversations.append(turns)
        sources.append(source)
N = len(conversations)
if N == 0:
    fail(f"{src}:1: empty file, expected one JSON object a line")
if not 0 <= args.dev < N:
    fail(f"--dev {args.dev}: expected 0 to {N - 1}, since {src} has {N} dialogues and one must be left to train on")

# Without --tokenizer (the tiny demo), a small BPE model set up like LLaMA's: byte fallback (any text encodes),
# digits split, whitespace kept as is (code indentation), the same special ids; one thread, so the same input always
# gives the same file.
if not args.tokenizer:
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=(s for turns in conversations for t in turns for s in t.split("\n") if s.strip()),
            model_writer=model, model_type="bpe", vocab_size=args.vocab_size, hard_vocab_limit=False,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, split_digits=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
            max_sentence_length=1 << 16, num_threads=1, minloglevel=2)
    except RuntimeError as e:  # e.g. fewer pieces than the input has distinct characters
        fail(f"--vocab_size {args.vocab_size}: cannot train a tokenizer on {src} ({e})")
    model = model.getvalue()

# -----------------------------------------------------------------------------
# encode and write into a temporary directory beside OUT, then rename it into place

import torch  # noqa: E402 (torch takes seconds to load: only once the input is known to be good)

from model import Tokenizer  # noqa: E402

tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
try:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    (tmp / "tokenizer.model").write_bytes(model)
    tok = Tokenizer(tmp / "tokenizer.model")
    # BOS, each turn then EOT, the mask on the assistant's tokens and their EOT; longer texts trimmed (LIMA §3)
    encoded = [tok.encode_dialogue(turns)
               for turns in tqdm(conversations, desc="encoding", unit=" dialogues", disable=N < 200)]
    ids = [torch.tensor(i[: args.max_len], dtype=torch.long) for i, _ in encoded]
    mask = [torch.tensor(m[: args.max_len], dtype=torch.bool) for _, m in encoded]

    dev = set(random.Random(args.seed).sample(range(N), args.dev))
    for name, keep in (("train", [k for k in range(N) if k not in dev]), ("dev", sorted(dev))):
        torch.save({
            "ids": [ids[k] for k in keep], "mask": [mask[k] for k in keep],
            "conversations": [conversations[k] for k in keep], "source": [sources[k] for k in keep],
            "eot_id": tok.eot_id, "n_words": tok.n_words, "max_len": args.max_len,
            "tokenizer_sha256": hashlib.sha256(model).hexdigest(),  # lets train.py refuse a mismatched vocabulary
        }, tmp / f"{name}.pt")

    old = tmp.with_name(tmp.name + ".old")
    if out.exists():  # an earlier output (checked above): moved aside, replaced, then deleted
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
except (OSError, RuntimeError) as e:  # unwritable or full; torch.save says RuntimeError
    fail(f"--out {out}: cannot write it ({e})")
finally:
    shutil.rmtree(tmp, ignore_errors=True)  # gone already unless something failed

# -----------------------------------------------------------------------------
# summary

lengths = sorted(len(i) for i, _ in encoded)  # before trimming
pct = {q: lengths[min(N - 1, int(q / 100 * N))] for q in (50, 90, 99)}
print(f"wrote {out}/: {N:,} dialogues ({N - len(dev):,} train, {len(dev):,} dev), "
      f"{sum(map(len, conversations)):,} turns, from {src}")
print(f"tokenizer: {args.tokenizer or f'trained on {src}'}, {tok.eot_id:,} pieces + EOT (id {tok.eot_id:,})")
print(f"tokens: {sum(lengths):,} before trimming; {sum(n > args.max_len for n in lengths):,} dialogues trimmed at "
      f"{args.max_len:,}, leaving {sum(map(len, ids)):,} tokens, of which {sum(int(m.sum()) for m in mask):,} supervised")
print(f"tokens per dialogue before trimming: p50 {pct[50]:,}, p90 {pct[90]:,}, p99 {pct[99]:,}, max {lengths[-1]:,}")
print("sources: " + ", ".join(f"{s or '(none)'} {c:,}" for s, c in Counter(sources).most_common()))
if unsupervised := sum(not m.any() for m in mask):
    print(f"warning: {unsupervised:,} dialogues keep no assistant token within --max_len {args.max_len:,}")
