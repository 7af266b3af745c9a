"""Shared pytest fixtures: a small prepared data set built without prepare.py, and a trained tiny demo model."""
import hashlib
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parent
NUMBERS = "zero one two three four five six seven eight nine ten eleven twelve".split()


def toy_dialogues(n, seed=0):
    """Arithmetic questions and answers of varied length, some with a follow-up turn."""
    rng = random.Random(seed)
    dialogues = []
    for i in range(n):
        a, b = rng.randrange(7), rng.randrange(6)
        turns = [f"what is {NUMBERS[a]} plus {NUMBERS[b]}?" + " please think carefully." * rng.randrange(4),
                 f"{NUMBERS[a]} plus {NUMBERS[b]} is {NUMBERS[a + b]}." + " it is simple." * rng.randrange(6)]
        if i % 5 == 0:
            turns += ["and times two?", f"two times {NUMBERS[a + b]} is {a * 2 + b * 2}."]
        dialogues.append(turns)
    return dialogues


def write_prepared(out: Path, tokenizer_model: Path, dialogues, n_dev=4):
    """prepare.py's output format (train.pt, dev.pt, tokenizer.model), written directly from Tokenizer."""
    from model import Tokenizer

    out.mkdir(parents=True)
    (out / "tokenizer.model").write_bytes(tokenizer_model.read_bytes())
    tok = Tokenizer(out / "tokenizer.model")
    sha = hashlib.sha256(tokenizer_model.read_bytes()).hexdigest()
    for split, convs in (("dev", dialogues[:n_dev]), ("train", dialogues[n_dev:])):
        encoded = [tok.encode_dialogue(c) for c in convs]
        torch.save({"ids": [torch.tensor(i) for i, _ in encoded], "mask": [torch.tensor(m) for _, m in encoded],
                    "conversations": convs, "source": [""] * len(convs), "eot_id": tok.eot_id,
                    "n_words": tok.n_words, "tokenizer_sha256": sha, "max_len": 2048}, out / f"{split}.pt")
    return out


def train_spm(prefix: Path, dialogues, vocab_size):
    import sentencepiece as spm

    text = prefix.with_suffix(".txt")
    text.write_text("\n".join(t for d in dialogues for t in d))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(prefix), vocab_size=vocab_size,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, minloglevel=2)
    return prefix.with_suffix(".model")


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    """A prepared 44-dialogue set (40 train, 4 dev) and a second one tokenized with a different vocabulary."""
    tmp = tmp_path_factory.mktemp("toy")
    dialogues = toy_dialogues(44)
    data = write_prepared(tmp / "data", train_spm(tmp / "spm", dialogues, 96), dialogues)
    other = write_prepared(tmp / "other", train_spm(tmp / "spm2", dialogues, 80), dialogues)
    return data, other


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The README demo, shortened: prepare.py on data/sample.jsonl, then train.py --size tiny, narrowed to 64 wide
    and 2 layers, for 4 epochs. Returns (data dir, out dir); out/epoch_04/ holds the trained model."""
    tmp = tmp_path_factory.mktemp("demo")
    data, out = tmp / "prepared", tmp / "out"
    for cmd in ([sys.executable, "prepare.py", "--input", "data/sample.jsonl", "--out", str(data)],
                [sys.executable, "train.py", "--size", "tiny", "--data", str(data), "--out", str(out),
                 "--dim", "64", "--n_layers", "2", "--n_heads", "2", "--epochs", "4", "--batch_size", "4",
                 "--lr", "3e-3", "--save_epochs", "4", "--dev_samples", "2"]):
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}"
    return data, out
