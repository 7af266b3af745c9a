"""LIMA's evaluation on the real test set, end to end: sample.py answers all 300 prompts of
../shared/lima/test.jsonl in file order and resumes after a kill; compare.py judges and rates those
answers and reports them. A tiny random model stands in for LIMA: what is tested is the plumbing on
the real file, not the answers. Skipped where ../shared/lima/test.jsonl is absent."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from model import ModelArgs, Tokenizer, Transformer

ROOT = Path(__file__).parent
TEST_SET = ROOT.parent / "shared" / "lima" / "test.jsonl"

pytestmark = pytest.mark.skipif(not TEST_SET.is_file(),
                                reason=f"needs LIMA's 300 test prompts at {TEST_SET} (see ../shared/README.md)")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # a model this small decodes faster on one thread


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, toy_data):
    """A checkpoint in Meta's layout: a 2-layer, 64-wide random LLaMA with conftest's toy tokenizer, its
    context long enough for the longest test prompt in that tokenizer's 96 pieces."""
    d = tmp_path_factory.mktemp("tiny") / "epoch_01"
    d.mkdir()
    (d / "tokenizer.model").write_bytes((toy_data[0] / "tokenizer.model").read_bytes())
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 32, "norm_eps": 1e-6,
              "vocab_size": Tokenizer(d / "tokenizer.model").n_words, "max_seq_len": 2048}
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**params))
    torch.save(model.state_dict(), d / "consolidated.00.pth")
    (d / "params.json").write_text(json.dumps(params))
    return d


def lima_prompts():
    return [json.loads(line)["conversations"][0] for line in TEST_SET.read_text(encoding="utf-8").splitlines()]


def sample_cmd(ckpt, output, batch_size, *flags):
    """sample.py on the test set: greedy unless flags say otherwise, 6 tokens an answer."""
    return [sys.executable, str(ROOT / "sample.py"), "--prompts", str(TEST_SET), "--output", str(output),
            "--ckpt", str(ckpt), "--max_new_tokens", "6", "--batch_size", str(batch_size),
            *map(str, flags or ["--temperature", 0])]


def lines_of(path):
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


def test_sample_answers_all_300_test_prompts_in_order_and_resumes_after_a_kill(ckpt, tmp_path):
    prompts = lima_prompts()
    assert len(prompts) == 300 and all(prompts)
    whole = tmp_path / "whole.jsonl"
    r = subprocess.run(sample_cmd(ckpt, whole, 8), capture_output=True, text=True, env=ENV,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    answers = [json.loads(line) for line in lines_of(whole)]
    assert [a["prompt"] for a in answers] == prompts  # read whole, answered in file order
    assert all(isinstance(a["response"], str) and 0 <= a["tokens"] <= 6 for a in answers)

    # one prompt a batch, killed once some answers are in, then run again to the end
    killed = tmp_path / "killed.jsonl"
    p = subprocess.Popen(sample_cmd(ckpt, killed, 1), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 240
    while len(lines_of(killed)) < 20 and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    p.kill()
    p.wait()
    k = len(lines_of(killed))
    assert 20 <= k < 300, k
    r = subprocess.run(sample_cmd(ckpt, killed, 8), capture_output=True, text=True, env=ENV,
                       timeout=300)
    assert r.returncode == 0 and f"{k} prompts already answered, {300 - k} to go" in r.stderr
    # greedy answers do not depend on the batch: the resumed file is the uninterrupted one, line for line
    assert killed.read_text(encoding="utf-8") == whole.read_text(encoding="utf-8")


def compare(*flags, cwd, input=""):
    return subprocess.run([sys.executable, str(ROOT / "compare.py"), *map(str, flags)], cwd=cwd, input=input,
                          capture_output=True, text=True, timeout=120)


def test_compare_judges_and_rates_the_300_answers(ckpt, tmp_path):
    for name, flags in (("greedy.jsonl", []), ("sampled.jsonl", ["--temperature", 0.7, "--seed", 0])):
        r = subprocess.run(sample_cmd(ckpt, tmp_path / name, 16, *flags), env=ENV, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    # both orders by a person who always presses 1: every item a tie, the two orders never agree
    r = compare("greedy.jsonl", "sampled.jsonl", "--out", "j.jsonl", "--annotator", "ana", "--both_orders",
                input="1\n" * 600, cwd=tmp_path)
    assert r.returncode == 0 and "300 prompts in both orders, 0 judged before, 600 to go" in r.stdout
    assert "300 of 300 judged in both orders" in r.stdout
    r = compare("--report", "j.jsonl", cwd=tmp_path)
    [summary] = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert (summary["n"], summary["tie"], summary["both_orders"]["agreement"]) == (300, 1.0, 0.0)
    # LIMA's absolute analysis: 50 of the 300 answers, the same 50 on a rerun
    r = compare("--rate", "greedy.jsonl", "--out", "r.jsonl", "--annotator", "ana", input="p\n" * 20,
                cwd=tmp_path)
    assert r.returncode == 0 and "50 prompts, 0 rated before, 50 to go" in r.stdout
    r = compare("--rate", "greedy.jsonl", "--out", "r.jsonl", "--annotator", "ana", input="e\n" * 50,
                cwd=tmp_path)
    assert "50 prompts, 20 rated before, 30 to go" in r.stdout
    rated = [json.loads(line)["prompt"] for line in lines_of(tmp_path / "r.jsonl")]
    prompts = lima_prompts()
    assert len(set(rated)) == 50 and rated == sorted(rated, key=prompts.index)
    r = compare("--report", "r.jsonl", cwd=tmp_path)
    [summary] = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert (summary["n"], summary["fail"], summary["pass"], summary["excellent"]) == (50, 0.0, 0.4, 0.6)
