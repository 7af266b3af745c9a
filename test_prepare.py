"""prepare.py end to end: the sample, the real LIMA data (when present beside the checkout) and every bad input."""
import ctypes
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from model import Tokenizer

ROOT = Path(__file__).resolve().parent
SAMPLE = ROOT / "data" / "sample.jsonl"
LIMA = ROOT.parent / "shared" / "lima" / "train.jsonl"
LLAMA = ROOT.parent / "shared" / "llama" / "tokenizer.model"
OUTPUTS = {"train.pt", "dev.pt", "tokenizer.model"}
KEYS = {"ids", "mask", "conversations", "source", "eot_id", "n_words", "tokenizer_sha256", "max_len"}


def prepare(*args):
    return subprocess.run([sys.executable, "prepare.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def prepare_in(cwd, *args):
    """prepare.py run from another directory: where --out and --input are relative to."""
    return subprocess.run([sys.executable, ROOT / "prepare.py", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def load(path):
    return torch.load(path, weights_only=True)


def tree(path):
    """{relative path: sha256} of every file under path."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample") / "prepared"
    start = time.perf_counter()
    result = prepare("--out", out)
    return out, result, time.perf_counter() - start


def test_sample_data_covers_lima_kinds_of_requests():
    rows = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
    assert len(rows) >= 40
    assert all(set(r) == {"conversations", "source"} and len(r["conversations"]) % 2 == 0 for r in rows)
    assert sum(4 <= len(r["conversations"]) <= 6 for r in rows) >= 5
    sources = {r["source"] for r in rows}
    assert {"travel", "alternate_history", "advice", "how_to", "code", "explanation", "writing"} <= sources


def test_sample_prepares_in_seconds(sample):
    out, result, seconds = sample
    assert result.returncode == 0, result.stderr
    assert seconds < 30, f"prepare.py took {seconds:.1f}s on the sample"
    assert {p.name for p in out.iterdir()} == OUTPUTS
    assert [p.name for p in out.parent.iterdir()] == ["prepared"]  # no temporary directory left beside it
    assert "47 dialogues (42 train, 5 dev), 118 turns" in result.stdout
    rows = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
    train, dev = load(out / "train.pt"), load(out / "dev.pt")
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    for data in (train, dev):
        assert set(data) == KEYS
        assert data["eot_id"] == sp.vocab_size() == 2000 and data["n_words"] == 2001 and data["max_len"] == 2048
        assert data["tokenizer_sha256"] == hashlib.sha256((out / "tokenizer.model").read_bytes()).hexdigest()
        for ids, mask in zip(data["ids"], data["mask"], strict=True):
            assert ids.dtype == torch.long and mask.dtype == torch.bool and ids.shape == mask.shape
            assert ids[0] == 1 and ids[-1] == 2000 and mask[-1] and not mask[0]  # BOS ... EOT; none trimmed
    assert len(train["ids"]) == 42 and len(dev["ids"]) == 5
    # every input dialogue lands in exactly one split, training order kept
    assert sorted(map(json.dumps, train["conversations"] + dev["conversations"])) == \
        sorted(json.dumps(r["conversations"]) for r in rows)
    kept = [r for r in rows if r["conversations"] not in dev["conversations"]]
    assert train["conversations"] == [r["conversations"] for r in kept]
    assert train["source"] == [r["source"] for r in kept]


def test_known_dialogue_position_by_position(sample):
    out = sample[0]
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    eot = sp.vocab_size()
    train, dev = load(out / "train.pt"), load(out / "dev.pt")
    data = train if any(c[0].startswith("My Python code gives") for c in train["conversations"]) else dev
    k = next(k for k, c in enumerate(data["conversations"]) if c[0].startswith("My Python code gives"))
    turns = data["conversations"][k]
    assert len(turns) == 6
    ids, mask = data["ids"][k].tolist(), data["mask"][k].tolist()
    want_ids, want_mask = [1], [False]  # BOS, never trained on
    for i, turn in enumerate(turns):
        piece = sp.encode(turn) + [eot]  # every utterance ends with EOT (LIMA §2)
        want_ids += piece
        want_mask += [i % 2 == 1] * len(piece)  # loss on the assistant's tokens and their EOT
    assert len(ids) == len(want_ids) and sum(want_mask) == sum(mask)
    for pos, (got, want, m, wm) in enumerate(zip(ids, want_ids, mask, want_mask)):
        assert (got, m) == (want, wm), f"position {pos}"
    # read back: the EOT-separated spans decode to the original turns, masked spans exactly the assistant's
    spans, span, masked = [], [], []
    for i, m in zip(ids[1:], mask[1:]):
        if i == eot:
            spans.append(sp.decode(span))
            masked.append(m)
            span = []
        else:
            span.append(i)
    assert spans == turns and masked == [False, True] * 3


def test_trained_tokenizer_round_trips_any_text(sample):
    sp = spm.SentencePieceProcessor(model_file=str(sample[0] / "tokenizer.model"))
    rows = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
    for turn in (t for r in rows for t in r["conversations"]):
        assert sp.decode(sp.encode(turn)) == turn  # indentation, newlines and digits survive
    text = "日本語 ∑ 🙂 naïve\n\tcode()  "
    assert 0 not in sp.encode(text) and sp.decode(sp.encode(text)) == text  # byte fallback: no <unk>


def test_same_input_same_output_and_replaces_earlier_output(sample, tmp_path):
    out = tmp_path / "prepared"
    shutil.copytree(sample[0], out)
    result = prepare("--out", out)
    assert result.returncode == 0, result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["prepared"]
    assert (out / "tokenizer.model").read_bytes() == (sample[0] / "tokenizer.model").read_bytes()
    for name in ("train.pt", "dev.pt"):
        a, b = load(out / name), load(sample[0] / name)
        assert a["conversations"] == b["conversations"]
        assert all(torch.equal(x, y) for x, y in zip(a["ids"] + a["mask"], b["ids"] + b["mask"], strict=True))


def test_lima_train_numbers(tmp_path):
    for path in (LIMA, LLAMA):
        if not path.exists():
            pytest.skip(f"../{path.relative_to(ROOT.parent)} not found")
    out = tmp_path / "lima"
    result = prepare("--input", LIMA, "--tokenizer", LLAMA, "--dev", 0, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "1,022 dialogues (1,022 train, 0 dev), 2,044 turns" in result.stdout
    assert ("tokens: 718,845 before trimming; 68 dialogues trimmed at 2,048, leaving 679,203 tokens, "
            "of which 617,132 supervised") in result.stdout
    assert "p50 479," in result.stdout and "max 3,921" in result.stdout
    train, dev = load(out / "train.pt"), load(out / "dev.pt")
    assert len(dev["ids"]) == 0 and len(train["ids"]) == 1022
    assert sum(len(ids) for ids in train["ids"]) == 679_203
    assert sum(int(mask.sum()) for mask in train["mask"]) == 617_132
    assert max(len(ids) for ids in train["ids"]) == 2048
    assert train["eot_id"] == 32000 and train["n_words"] == 32001 and train["max_len"] == 2048
    assert (out / "tokenizer.model").read_bytes() == LLAMA.read_bytes()
    assert train["tokenizer_sha256"] == hashlib.sha256(LLAMA.read_bytes()).hexdigest()
    # the untrimmed count, recomputed from the saved raw turns; a trimmed dialogue is the untrimmed one's prefix
    tok = Tokenizer(LLAMA)
    full = [tok.encode_dialogue(c) for c in train["conversations"]]
    assert sum(len(ids) for ids, _ in full) == 718_845
    long = [k for k, (ids, _) in enumerate(full) if len(ids) > 2048]
    assert len(long) == 68
    k = long[0]
    assert train["ids"][k].tolist() == full[k][0][:2048] and train["mask"][k].tolist() == full[k][1][:2048]


GOOD = '{"conversations": ["Hi there.", "Hello! How can I help?"], "source": "test"}\n'
BAD_LINES = {  # name: (bad line, placed at line 3 after two good ones; what the message must say)
    "invalid_json": ('{"conversations": ["a", "b"]', "invalid JSON"),
    "bad_utf8": (b'{"conversations": ["caf\xe9", "b"]}', "invalid JSON"),
    "not_an_object": ('["a", "b"]', '"conversations"'),
    "no_conversations": ('{"source": "x"}', '"conversations"'),
    "conversations_not_list": ('{"conversations": "a b"}', "expected a list"),
    "non_string_turn": ('{"conversations": ["a", 42]}', "turn 2 is 42"),
    "empty_turn": ('{"conversations": ["a", ""]}', 'turn 2 is ""'),
    "blank_turn": ('{"conversations": ["  \\n ", "b"]}', "turn 1"),
    "lone_surrogate": ('{"conversations": ["caf\\ud800", "b"]}', 'turn 1 is "caf\\ud800", expected'),
    "nested_too_deep": ('{"conversations": ' + "[" * 100_000 + "]" * 100_000 + "}", "invalid JSON"),
    "test_prompt": ('{"conversations": ["What is LIMA?"]}', "test example"),
    "no_turns": ('{"conversations": []}', "0 turns"),
    "ends_with_user": ('{"conversations": ["a", "b", "c"]}', "3 turns"),
    "source_not_string": ('{"conversations": ["a", "b"], "source": 7}', '"source"'),
}


def bad_cases(base):
    """(name, args, text the one-line message must hold, whether a good OUT exists beforehand)"""
    cases = []
    for i, (name, (line, says)) in enumerate(BAD_LINES.items()):
        path = base / name / "data.jsonl"
        path.parent.mkdir()
        line = line if isinstance(line, bytes) else line.encode()
        path.write_bytes((GOOD * 2).encode() + line + b"\n" + GOOD.encode())
        cases.append((name, ["--input", path], [f"{path}:3:", says], i % 2 == 0))
    for name, content in (("empty_file", ""), ("blank_file", "\n  \n")):
        path = base / name / "data.jsonl"
        path.parent.mkdir()
        path.write_text(content)
        cases.append((name, ["--input", path], [f"{path}:1:", "empty file"], name == "empty_file"))
    for name, args, says, existing in [
        ("missing_input", ["--input", base / "nope.jsonl"], [f"{base / 'nope.jsonl'}:", "no such"], True),
        ("missing_tokenizer", ["--tokenizer", base / "nope.model"], [f"{base / 'nope.model'}:"], False),
        ("not_a_tokenizer", ["--tokenizer", SAMPLE], [f"{SAMPLE}:", "SentencePiece"], True),
        ("dev_too_large", ["--dev", 47], ["--dev 47", "0 to 46"], False),
        ("dev_negative", ["--dev", -1], ["--dev -1"], True),
        ("max_len_too_small", ["--max_len", 1], ["--max_len 1", "at least 2"], False),
        ("max_len_not_int", ["--max_len", "lots"], ["--max_len", "invalid int"], True),
        ("vocab_too_small", ["--vocab_size", 100], ["--vocab_size 100", "data/sample.jsonl"], False),
    ]:
        (base / name).mkdir()
        cases.append((name, args, says, existing))
    return cases


def test_bad_input_one_line_no_output(sample, tmp_path):
    cases = bad_cases(tmp_path)
    for name, _, _, existing in cases:
        if existing:
            shutil.copytree(sample[0], tmp_path / name / "out" / "prepared")
    before = {name: tree(tmp_path / name) for name, *_ in cases}

    for name, args, says, existing in cases:
        result = prepare(*args, "--out", tmp_path / name / "out" / "prepared")
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0, name
        assert "Traceback" not in result.stderr, f"{name}: {result.stderr}"
        assert result.stdout == "", name
        if name != "max_len_not_int":  # argparse's own error comes after its usage line
            assert len(lines) == 1 and lines[0].startswith("error: "), f"{name}: {result.stderr}"
        assert all(s in lines[-1] for s in says), f"{name}: {lines[-1]!r} should say {says}"
        assert tree(tmp_path / name) == before[name], f"{name}: files changed"
        out_parent = tmp_path / name / "out"
        assert not out_parent.exists() or [p.name for p in out_parent.iterdir()] == ["prepared"], name


def test_unwritable_or_full_output_is_one_line(sample, tmp_path):
    """A full disk (a 100 kB file size limit: train.pt does not fit) leaves the earlier output as it was and
    no temporary directory; an --out under a file cannot be made."""
    shutil.copytree(sample[0], tmp_path / "full" / "prepared")
    before = tree(tmp_path / "full")

    def full_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), no signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    (tmp_path / "file").write_text("")
    full, under_file = (subprocess.Popen([sys.executable, "prepare.py", "--out", out], cwd=ROOT, text=True,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=limit)
                        for out, limit in ((tmp_path / "full" / "prepared", full_disk),
                                           (tmp_path / "file" / "prepared", None)))  # both at once
    err = full.communicate()[1]
    assert full.returncode == 1 and err.startswith(f"error: --out {tmp_path}/full/prepared: cannot write it")
    assert len(err.splitlines()) == 1 and tree(tmp_path / "full") == before
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["prepared"]
    assert (under_file.communicate()[1], under_file.returncode) == (
        f"error: --out {tmp_path / 'file' / 'prepared'}: cannot write it ([Errno 17] File exists: "
        f"'{tmp_path / 'file'}')\n", 1)


def test_refuses_to_replace_a_directory_it_did_not_write(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    result = prepare("--out", tmp_path)
    assert result.returncode == 1 and "not an earlier prepare.py output" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def rows_of(path):
    return [json.loads(line)["conversations"] for line in path.read_text(encoding="utf-8").splitlines()]


def chosen(out):
    """The conversations in OUT's train.pt and dev.pt; none in both."""
    train, dev = load(out / "train.pt")["conversations"], load(out / "dev.pt")["conversations"]
    assert not any(c in train for c in dev)
    return train, dev


def test_first_and_sample_choose_the_dialogues(sample, tmp_path):
    rows, tokenizer = rows_of(SAMPLE), sample[0] / "tokenizer.model"  # the sample's: no tokenizer to train
    result = prepare("--first", 10, "--dev", 2, "--tokenizer", tokenizer, "--out", tmp_path / "first")
    assert result.returncode == 0, result.stderr
    assert ("10 dialogues (8 train, 2 dev), 20 turns, from data/sample.jsonl (the first 10 of its 47)"
            in result.stdout)
    train, dev = chosen(tmp_path / "first")
    assert sorted(map(json.dumps, train + dev)) == sorted(map(json.dumps, rows[:10]))
    assert train == [c for c in rows[:10] if c not in dev]

    subsets = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        result = prepare("--sample", 10, "--dev", 2, "--seed", seed, "--tokenizer", tokenizer,
                         "--out", tmp_path / name)
        assert result.returncode == 0, result.stderr
        assert "10 dialogues (8 train, 2 dev), " in result.stdout
        assert f"from data/sample.jsonl (10 of its 47, chosen by --seed {seed})" in result.stdout
        train, dev = chosen(tmp_path / name)
        picked = [k for k, c in enumerate(rows) if c in train + dev]
        assert len(picked) == 10 and train == [rows[k] for k in picked if rows[k] not in dev]  # input order kept
        assert picked == sorted(random.Random(seed).sample(range(47), 10))
        subsets[name] = picked, dev
    assert subsets["a"] == subsets["b"] and subsets["a"][0] != subsets["c"][0]
    # all of them is all of them: --first 47 is the plain run
    result = prepare("--first", 47, "--tokenizer", tokenizer, "--out", tmp_path / "all")
    assert "47 dialogues (42 train, 5 dev), 118 turns" in result.stdout
    assert chosen(tmp_path / "all") == (load(sample[0] / "train.pt")["conversations"],
                                        load(sample[0] / "dev.pt")["conversations"])


def test_lima_sample_walk_through_as_the_readme_shows(tmp_path):
    """The README's small real-data run: 64 of LIMA's dialogues, the summary it prints as the README quotes it."""
    for path in (LIMA, LLAMA):
        if not path.exists():
            pytest.skip(f"../{path.relative_to(ROOT.parent)} not found")
    out = tmp_path / "lima64"
    result = prepare("--input", "../shared/lima/train.jsonl", "--tokenizer", "../shared/llama/tokenizer.model",
                     "--sample", 64, "--dev", 4, "--out", out)
    assert result.returncode == 0, result.stderr
    printed = result.stdout.replace(str(out), "data/lima64")
    assert printed.startswith("wrote data/lima64/: 64 dialogues (60 train, 4 dev), 128 turns, from "
                              "../shared/lima/train.jsonl (64 of its 1,022, chosen by --seed 1337)\n")
    assert f"```\n{printed}```" in (ROOT / "README.md").read_text(encoding="utf-8")
    train, dev = chosen(out)
    rows = rows_of(LIMA)
    subset = [rows[k] for k in sorted(random.Random(1337).sample(range(1022), 64))]  # --seed's 64, in order
    assert sorted(map(json.dumps, train + dev)) == sorted(map(json.dumps, subset)) and len(dev) == 4
    assert train == [c for c in subset if c not in dev]


def test_bad_first_sample_and_out_are_exactly_one_line(tmp_path):
    """Each refusal: exit 1, exactly one line, and not a file written or removed anywhere under tmp_path."""
    here = tmp_path / "here"  # an empty directory to run in
    here.mkdir()
    (tmp_path / "ours").mkdir()  # an input named like an output, in a directory holding only that
    shutil.copy(SAMPLE, tmp_path / "ours" / "train.pt")
    cases = [  # (args, the line)
        (["--first", 0], "error: --first 0: expected >= 1"),
        (["--first", -3], "error: --first -3: expected >= 1"),
        (["--sample", 0], "error: --sample 0: expected >= 1"),
        (["--first", 2, "--sample", 2], "error: --first and --sample: expected one of them, not both"),
        (["--first", 48], f"error: --first 48: expected at most 47, the dialogues in {SAMPLE}"),
        (["--sample", 1000], f"error: --sample 1000: expected at most 47, the dialogues in {SAMPLE}"),
        (["--first", 3, "--dev", 3], "error: --dev 3: expected 0 to 2, leaving one of 3 dialogues to train on"),
        (["--sample", 1, "--dev", 1], "error: --dev 1: expected 0 to 0, leaving one of 1 dialogues to train on"),
        (["--input", here], f"error: {here}: cannot read it (Is a directory)"),
        (["--out", "."], "error: --out .: the current directory or one above it; not replacing it"),
        (["--out", ""], "error: --out .: the current directory or one above it; not replacing it"),
        (["--out", "sub/.."], "error: --out .: the current directory or one above it; not replacing it"),
        (["--out", ".."], "error: --out ..: the current directory or one above it; not replacing it"),
        (["--out", tmp_path], f"error: --out {tmp_path}: the current directory or one above it; not replacing it"),
        (["--out", SAMPLE.parent],
         f"error: --out {SAMPLE.parent}: is or holds the input {SAMPLE}; not replacing it"),
        (["--out", SAMPLE], f"error: --out {SAMPLE}: is or holds the input {SAMPLE}; not replacing it"),
        (["--input", tmp_path / "ours" / "train.pt", "--out", tmp_path / "ours"],
         f"error: --out {tmp_path / 'ours'}: is or holds the input {tmp_path / 'ours' / 'train.pt'}; "
         "not replacing it"),
    ]
    before, data = tree(tmp_path), tree(SAMPLE.parent)
    for args, line in cases:
        result = prepare_in(here, "--input", SAMPLE, "--out", "o", *args)  # the case's own flags come last, win
        assert (result.returncode, result.stderr, result.stdout) == (1, line + "\n", ""), args
        assert tree(tmp_path) == before and tree(SAMPLE.parent) == data, f"{args}: files changed"
        assert list(here.iterdir()) == [], args


def obey_permissions():
    """For a child process: root too obeys file modes (CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH dropped)."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in (1, 2):  # the two capabilities that let root read, write and search past a file's mode
            if libc.prctl(24, cap, 0, 0, 0):  # PR_CAPBSET_DROP: gone from the bounding set, so from the exec
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_unreadable_input_and_unwritable_out_are_one_line(sample, tmp_path):
    """A file or directory whose mode forbids it: an --input it may not read (or look for), an --out it may not
    list (or look for) or create. As root, the child drops the capabilities that ignore modes."""
    for name in ("locked", "hidden", "no_list", "read_only"):
        (tmp_path / name).mkdir()
    for path in (tmp_path / "locked" / "data.jsonl", tmp_path / "hidden" / "data.jsonl", tmp_path / "data.jsonl"):
        shutil.copy(SAMPLE, path)
    modes = {tmp_path / "locked" / "data.jsonl": 0o000, tmp_path / "hidden": 0o000, tmp_path / "no_list": 0o000,
             tmp_path / "read_only": 0o555}
    before = tree(tmp_path)
    try:
        for path, mode in modes.items():
            path.chmod(mode)
        try:
            probe = subprocess.run([sys.executable, "-c", f"open({str(tmp_path / 'locked' / 'data.jsonl')!r})"],
                                   preexec_fn=obey_permissions, capture_output=True, text=True)
        except subprocess.SubprocessError as e:
            pytest.skip(f"cannot make file modes bind here ({e})")
        if probe.returncode == 0:
            pytest.skip("a file of mode 000 is readable here: nothing to refuse")
        good = tmp_path / "data.jsonl"
        cases = [  # (args, the line, or None: the line made from the process id)
            (["--input", tmp_path / "locked" / "data.jsonl", "--out", tmp_path / "o"],
             f"error: {tmp_path / 'locked' / 'data.jsonl'}: cannot read it (Permission denied)"),
            (["--input", tmp_path / "hidden" / "data.jsonl", "--out", tmp_path / "o"],
             f"error: {tmp_path / 'hidden' / 'data.jsonl'}: cannot read it (Permission denied)"),
            (["--input", good, "--out", tmp_path / "no_list"],
             f"error: --out {tmp_path / 'no_list'}: cannot read it (Permission denied)"),
            (["--input", good, "--out", tmp_path / "hidden" / "o"],
             f"error: --out {tmp_path / 'hidden' / 'o'}: cannot read it (Permission denied)"),
            (["--input", good, "--out", tmp_path / "read_only" / "a" / "b"],
             f"error: --out {tmp_path / 'read_only' / 'a' / 'b'}: cannot write it ([Errno 13] Permission denied: "
             f"'{tmp_path / 'read_only' / 'a'}')"),
            (["--input", good, "--out", tmp_path / "read_only" / "o"], None),  # the temporary directory is named
        ]
        for args, line in cases:
            child = subprocess.Popen([sys.executable, "prepare.py", *map(str, args), "--tokenizer",
                                      sample[0] / "tokenizer.model"], cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, preexec_fn=obey_permissions)
            stdout, stderr = child.communicate(timeout=300)
            line = line or (f"error: --out {tmp_path / 'read_only' / 'o'}: cannot write it ([Errno 13] Permission "
                            f"denied: '{tmp_path / 'read_only' / f'.o.tmp{child.pid}'}')")
            assert (child.returncode, stderr, stdout) == (1, line + "\n", ""), args
    finally:
        for path in modes:
            path.chmod(0o755 if path.is_dir() else 0o644)
    assert tree(tmp_path) == before  # nothing written, nothing removed
