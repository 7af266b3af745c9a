"""Dialogues, a JSON object a line as in GAIR/lima ({"conversations": [user, assistant, ...], "source": ...}),
to the token ids and loss masks train.py reads: OUT/train.pt, OUT/dev.pt and OUT/tokenizer.model. With no
flags, the tiny demo: data/sample.jsonl, with a small tokenizer trained on it. For LLaMA:
python prepare.py --input lima/train.jsonl --tokenizer llama/tokenizer.model --dev 50 --out data/lima"""
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

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--input", default="data/sample.jsonl", help="dialogues, one JSON object a line")
parser.add_argument("--tokenizer", help="SentencePiece model, e.g. LLaMA's (default: train one on the input)")
parser.add_argument("--out", default="data/prepared", help="output directory; an earlier output is replaced")
parser.add_argument("--max_len", type=int, default=2048, help="trim dialogues to this many tokens (LIMA §3)")
parser.add_argument("--dev", type=int, default=5, help="dialogues held out for train.py's dev loss")
parser.add_argument("--seed", type=int, default=1337, help="seed of the dev set's choice")
parser.add_argument("--vocab_size", type=int, default=2000, help="size of the tokenizer trained on the input")
args = parser.parse_args()
src, out = Path(args.input), Path(args.out)
check = lambda ok, message: ok or sys.exit(f"error: {message}")  # one line, no traceback, nothing written

# check everything before writing anything
check(src.is_file(), f"{src}: no such input file")
check(args.max_len >= 2, f"--max_len {args.max_len}: expected at least 2 (BOS and one token)")
check(not out.exists() or out.is_dir() and set(os.listdir(out)) <= {"train.pt", "dev.pt", "tokenizer.model"},
      f"{out}: not an earlier prepare.py output (train.pt, dev.pt, tokenizer.model); not replacing it")
if args.tokenizer:
    try:
        model = Path(args.tokenizer).read_bytes()  # copied into OUT
        spm.SentencePieceProcessor(model_proto=model)
    except (OSError, RuntimeError):
        sys.exit(f"error: {args.tokenizer}: no such file or not a SentencePiece model (like LLaMA's)")

conversations, sources = [], []
lines = {f"{src}:{n}": line for n, line in enumerate(src.read_bytes().split(b"\n"), 1) if line.strip()}
for where, line in lines.items():
    try:
        row = json.loads(line)  # from bytes: bad UTF-8 is reported with its line too
    except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, nesting too deep
        sys.exit(f"error: {where}: invalid JSON ({e})")
    check(isinstance(row, dict) and "conversations" in row,
          f'{where}: expected a JSON object with a "conversations" list')
    turns, source = row["conversations"], row.get("source", "")
    check(isinstance(turns, list),
          f'{where}: "conversations" is a {type(turns).__name__}, expected a list of strings')
    for i, turn in enumerate(turns, 1):  # a lone surrogate (a "\ud800" escape) is no text a tokenizer takes
        check(isinstance(turn, str) and turn.strip() and not any("\ud800" <= c <= "\udfff" for c in turn),
              f"{where}: turn {i} is {json.dumps(turn)[:40]}, expected non-empty text (valid Unicode)")
    why = "a lone prompt (a test example), nothing to train on" if len(turns) == 1 else f"{len(turns)} turns"
    check(len(turns) >= 2 and len(turns) % 2 == 0,  # LIMA §2: turns alternate, user first; answers train
          f"{where}: {why}; expected user/assistant turns ending with an answer (an even number, at least 2)")
    check(isinstance(source, str), f'{where}: "source" is a {type(source).__name__}, expected a string')
    conversations.append(turns)
    sources.append(source)
N = len(conversations)
check(N > 0, f"{src}:1: empty file, expected one JSON object a line")
check(0 <= args.dev < N, f"--dev {args.dev}: expected 0 to {N - 1}, leaving one of {N} dialogues to train on")

# Without --tokenizer (the tiny demo), a small BPE model like LLaMA's: byte fallback (any text encodes),
# digits split, whitespace kept (code indentation), the same special ids; one thread: same input, same file.
if not args.tokenizer:
    model = io.BytesIO()
    sentences = (s for turns in conversations for t in turns for s in t.split("\n") if s.strip())
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences, model_writer=model, model_type="bpe", vocab_size=args.vocab_size,
            hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
            split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, max_sentence_length=1 << 16, num_threads=1, minloglevel=2)
    except RuntimeError as e:  # e.g. fewer pieces than the input has distinct characters
        sys.exit(f"error: --vocab_size {args.vocab_size}: cannot train a tokenizer on {src} ({e})")
    model = model.getvalue()

# encode and write into a temporary directory beside OUT, then rename it into place
import torch  # noqa: E402 (torch takes seconds to load: only once the input is known to be good)
from model import Tokenizer  # noqa: E402

tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
try:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    (tmp / "tokenizer.model").write_bytes(model)
    tok = Tokenizer(tmp / "tokenizer.model")
    # BOS, each turn then EOT, the mask on the assistant's tokens and their EOT; trimmed (LIMA §3)
    encoded = [tok.encode_dialogue(turns) for turns in conversations]
    ids = [torch.tensor(i[: args.max_len]) for i, _ in encoded]
    mask = [torch.tensor(m[: args.max_len]) for _, m in encoded]
    columns = {"ids": ids, "mask": mask, "conversations": conversations, "source": sources}
    dev = set(random.Random(args.seed).sample(range(N), args.dev))
    for name, keep in (("train", [k for k in range(N) if k not in dev]), ("dev", sorted(dev))):
        torch.save({key: [column[k] for k in keep] for key, column in columns.items()} | {
            "eot_id": tok.eot_id, "n_words": tok.n_words, "max_len": args.max_len,
            "tokenizer_sha256": hashlib.sha256(model).hexdigest()}, tmp / f"{name}.pt")  # train.py checks it
    shutil.rmtree(out, ignore_errors=True)  # an earlier output (checked above), replaced once all is written
    tmp.rename(out)
except (OSError, RuntimeError) as e:  # unwritable or full; torch.save says RuntimeError
    sys.exit(f"error: --out {out}: cannot write it ({e})")
finally:
    shutil.rmtree(tmp, ignore_errors=True)  # gone already unless something failed

lengths = sorted(len(i) for i, _ in encoded)  # before trimming
print(f"wrote {out}/: {N:,} dialogues ({N - len(dev):,} train, {len(dev):,} dev), "
      f"{sum(map(len, conversations)):,} turns, from {src}")
print(f"tokenizer: {args.tokenizer or f'trained on {src}'}, {tok.eot_id:,} pieces + EOT (id {tok.eot_id:,})")
print(f"tokens: {sum(lengths):,} before trimming; {sum(n > args.max_len for n in lengths):,} dialogues "
      f"trimmed at {args.max_len:,}, leaving {sum(map(len, ids)):,} tokens, of which "
      f"{sum(int(m.sum()) for m in mask):,} supervised")
print("tokens per dialogue before trimming: "
      + ", ".join(f"p{q} {lengths[N * q // 100]:,}" for q in (50, 90, 99)) + f", max {lengths[-1]:,}")
if unsupervised := sum(not m.any() for m in mask):
    print(f"warning: {unsupervised:,} dialogues keep no assistant token within --max_len {args.max_len:,}")
