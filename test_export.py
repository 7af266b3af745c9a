"""Saved epochs are Hugging Face LLaMA directories: transformers loads them with no extra argument and
computes the same logits, the chat template gives encode_dialogue's ids, generation stops at EOT; every rank
writes its own rows (the same files from 1 and 3 processes) and a killed save leaves no half-written epoch."""
import json
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from checkpoint import hf_files, load_checkpoint, load_model
from model import ModelArgs, Tokenizer, Transformer, generate
from test_train import trained

transformers = pytest.importorskip("transformers")
LLAMA_TOKENIZER = ROOT.parent / "shared" / "llama" / "tokenizer.model"


def chat(turns):
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


def template_ids(hf_tok, turns, **kw):
    return hf_tok.apply_chat_template(chat(turns), tokenize=True, return_dict=True, **kw)["input_ids"]


def test_epoch_loads_in_transformers_with_equal_logits(demo_run):
    data, out = demo_run
    ckpt = out / "epoch_04"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "added_tokens.json", "config.json", "generation_config.json", "model-00001-of-00001.safetensors",
        "model.safetensors.index.json", "samples.jsonl", "special_tokens_map.json", "tokenizer.json",
        "tokenizer.model", "tokenizer_config.json"]
    tok = Tokenizer(ckpt / "tokenizer.model")
    config = json.loads((ckpt / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["torch_dtype"] == "bfloat16"
    assert (config["vocab_size"], config["bos_token_id"], config["eos_token_id"]) == (tok.n_words, 1, 2000)
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt)
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.dtype == torch.bfloat16
    weights = load_file(ckpt / "model-00001-of-00001.safetensors")
    assert weights["model.layers.1.self_attn.q_proj.weight"].dtype == torch.bfloat16
    ours = load_model(ckpt, dtype=torch.float32).eval()
    hf = hf.float().eval()
    tokens = torch.tensor([tok.encode_dialogue(c)[0][:200] for c in
                           torch.load(data / "dev.pt", weights_only=True)["conversations"][:1]])
    with torch.no_grad():
        a, b = hf(tokens).logits, ours(tokens)
    assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def check_chat_template(ckpt, tok, dialogues):
    hf_tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    assert (len(hf_tok), hf_tok.eos_token_id, hf_tok.bos_token_id) == (tok.n_words, tok.eot_id, tok.bos_id)
    assert hf_tok.convert_ids_to_tokens(tok.eot_id) == "<EOT>"
    for turns in dialogues:
        assert template_ids(hf_tok, turns) == tok.encode_dialogue(turns)[0]
        # a prompt for the model's answer ends after the user's EOT, as sample.py's does
        prompt = template_ids(hf_tok, turns[:1], add_generation_prompt=True)
        assert prompt == tok.encode_dialogue(turns[:1])[0]
        assert hf_tok(turns[0])["input_ids"] == [tok.bos_id, *tok.encode(turns[0])]


def test_chat_template_gives_encode_dialogues_ids(demo_run):
    data, out = demo_run
    ckpt = out / "epoch_04"
    dev = torch.load(data / "dev.pt", weights_only=True)["conversations"]
    dialogues = [dev[0][:2], [dev[0][0], dev[0][1], " and, with a leading space?", "Yes.\n\n  Two  spaces."]]
    check_chat_template(ckpt, Tokenizer(ckpt / "tokenizer.model"), dialogues)


@pytest.mark.skipif(not LLAMA_TOKENIZER.is_file(), reason=f"{LLAMA_TOKENIZER} not present")
def test_chat_template_with_llamas_tokenizer(tmp_path):
    tok = Tokenizer(LLAMA_TOKENIZER)
    for name, obj in hf_files(ModelArgs(vocab_size=tok.n_words), tok).items():
        (tmp_path / name).write_text(json.dumps(obj))
    (tmp_path / "tokenizer.model").write_bytes(LLAMA_TOKENIZER.read_bytes())
    dialogues = [["Plan a three-day trip to Kyoto.", "Day 1: Fushimi Inari at dawn..."],
                 ["Why is 2+2=4?", "Because  of   counting:\n\t1, 2, 3, 4 — ünïcode 😀", " and then?",
                  "```py\nx = 1\n```"]]
    lima = ROOT.parent / "shared" / "lima" / "train.jsonl"
    if lima.is_file():  # real dialogues: code, tables, runs of spaces, other scripts
        dialogues += [json.loads(line)["conversations"] for line in lima.read_text().splitlines()[:100]]
    check_chat_template(tmp_path, tok, dialogues)


def test_generation_stops_at_eot(demo_run):
    data, out = demo_run
    ckpt = out / "epoch_04"
    tok = Tokenizer(ckpt / "tokenizer.model")
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt).float()
    g = hf.generation_config
    assert (g.eos_token_id, g.do_sample, g.temperature, g.top_p, g.repetition_penalty, g.max_new_tokens) == \
        (tok.eot_id, True, 0.7, 0.9, 1.2, 2048)
    prompt = tok.encode_dialogue(torch.load(data / "dev.pt", weights_only=True)["conversations"][0][:1])[0]
    torch.manual_seed(0)
    answer = hf.generate(torch.tensor([prompt]))[0, len(prompt):].tolist()  # the saved LIMA decoding
    assert answer[-1] == tok.eot_id and tok.eot_id not in answer[:-1] and len(answer) < 2048
    # greedy, without the penalty (transformers' counts the prompt too): sample.py's decoder's tokens
    hf_greedy = hf.generate(torch.tensor([prompt]), do_sample=False, repetition_penalty=1.0,
                            max_new_tokens=30)
    ours = load_model(ckpt, dtype=torch.float32).eval()
    greedy = generate(ours, [prompt], tok.eot_id, 30, temperature=0, repetition_penalty=1.0)
    assert hf_greedy[0, len(prompt):].tolist() == [t.item() for t in greedy]


# -----------------------------------------------------------------------------
# a shape whose rows per rank cut through heads: q/k have 48 rows = 4 heads of 12, 16 rows on each of 3 ranks;
# the SwiGLU's 128 rows and the 97-token vocabulary split unevenly (43, 43, 42 and 33, 33, 31). lr 1e-30 keeps
# the initial weights exact, whatever the world size
ODD = ["--dim", "48", "--n_heads", "4", "--n_layers", "2", "--dev_samples", "0", "--lr", "1e-30",
       "--min_lr", "1e-30"]

KILL_AT_RENAME = """import os, runpy, signal, sys
target, rename = sys.argv.pop(1), os.rename
def kill_at(src, dst):
    if os.path.basename(dst) == target:  # every file of the new epoch is written, it is about to appear
        os.kill(os.getpid(), signal.SIGKILL)
    rename(src, dst)
os.rename = kill_at
sys.argv = sys.argv[1:]
sys.path.insert(0, os.getcwd())
runpy.run_path("train.py", run_name="__main__")
"""


def killed(target, out, *flags):
    """train.py in one process, SIGKILLed as it renames a directory to target."""
    (out.parent / "kill.py").write_text(KILL_AT_RENAME)
    cmd = [sys.executable, str(out.parent / "kill.py"), target, "train.py", "--out", str(out), *flags]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def killed_run(toy_data, tmp_path_factory):
    """Two epochs of 2 steps, saving both; killed as the second epoch would appear."""
    flags = ["--data", str(toy_data[0]), *ODD, "--epochs", "2", "--batch_size", "20", "--save_epochs", "all"]
    return killed("epoch_02", tmp_path_factory.mktemp("killed") / "out", *flags), flags


def test_one_and_three_processes_save_the_same_epoch(toy_data, killed_run, tmp_path):
    one = killed_run[0] / "epoch_01"
    three = trained(toy_data[0], tmp_path, *ODD, "--epochs", "1", "--batch_size", "40",
                    nproc=3) / "epoch_01"
    a, b = (load_file(d / "model-00001-of-00001.safetensors") for d in (one, three))
    assert a.keys() == b.keys() and len(a) == 3 + 9 * 2
    for k in a:
        assert torch.equal(a[k], b[k]), k
    index = "model.safetensors.index.json"
    assert (one / index).read_text() == (three / index).read_text()
    # and they are the model's initial weights, in Hugging Face's order (load_checkpoint undoes it)
    torch.manual_seed(1337)
    init = Transformer(ModelArgs.from_size("tiny", vocab_size=97, dim=48, n_heads=4, n_layers=2)).state_dict()
    loaded = load_checkpoint(three)[1]
    for k, v in init.items():
        assert torch.equal(loaded[k], v.bfloat16()), k


def test_killed_save_leaves_no_half_written_epoch(killed_run, tmp_path):
    out, flags = tmp_path / "out", [*killed_run[1], "--resume"]
    shutil.copytree(killed_run[0], out)
    assert not (out / "epoch_02").exists() and (out / ".tmp_epoch_02").is_dir()
    before_epoch_2 = shutil.copytree(out / "resume", tmp_path / "resume")  # the state epoch 2 resumes from
    first = load_checkpoint(out / "epoch_01")[1]
    trained_run = lambda: subprocess.run([sys.executable, "train.py", "--out", str(out), *flags], cwd=ROOT,
                                         capture_output=True, text=True)
    r = trained_run()
    assert r.returncode == 0, r.stderr[-2000:]  # the resumed run saves epoch 2 and clears the debris
    assert sorted(p.name for p in out.glob("*epoch_*")) == ["epoch_01", "epoch_02"]
    second = load_checkpoint(out / "epoch_02")[1]
    shutil.rmtree(out / "resume")
    shutil.copytree(before_epoch_2, out / "resume")
    killed("epoch_02", out, *flags)  # resumed again, it dies replacing epoch_02: the old one is aside, whole
    assert sorted(p.name for p in out.glob("*epoch_*")) == [".old_epoch_02", ".tmp_epoch_02", "epoch_01"]
    aside = load_checkpoint(out / ".old_epoch_02")[1]
    assert all(torch.equal(second[k], aside[k]) for k in second)
    r = trained_run()
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in out.glob("*epoch_*")) == ["epoch_01", "epoch_02"]
    assert all(torch.equal(first[k], v) for k, v in load_checkpoint(out / "epoch_01")[1].items())
    assert all(torch.equal(second[k], v) for k, v in load_checkpoint(out / "epoch_02")[1].items())

def test_readme_snippet_decodes_as_sample_token(demo_run):
    """The README's transformers snippet (generation_config.json, built-in penalty off, LIMA's penalty on the
    answer only) draws the first two tokens from sample_token's distribution: frequencies within 4 standard
    errors, nothing outside the nucleus, top-k off."""
    from transformers import RepetitionPenaltyLogitsProcessor
    from model import penalize, top_p_filter

    data, out = demo_run
    ckpt = out / "epoch_04"
    tok = Tokenizer(ckpt / "tokenizer.model")
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt).float().eval()
    assert hf.generation_config.top_k == 0
    prompt = tok.encode_dialogue(torch.load(data / "dev.pt", weights_only=True)["conversations"][0][:1])[0]
    n, draws = len(prompt), 3000
    torch.manual_seed(0)
    lima_penalty = RepetitionPenaltyLogitsProcessor(1.2, prompt_ignore_length=n)
    got = hf.generate(torch.tensor([prompt] * draws), attention_mask=torch.ones(draws, n, dtype=torch.long),
                      max_new_tokens=2, repetition_penalty=1.0, logits_processor=[lima_penalty],
                      pad_token_id=tok.eot_id)[:, n:]
    ours = load_model(ckpt, dtype=torch.float32).eval()

    def expected(ids, seen):  # sample_token's distribution after ids, the tokens seen penalized
        with torch.no_grad():
            logits = ours(torch.tensor([ids]))[0, -1].float()
        mask = torch.zeros(1, logits.shape[-1], dtype=torch.bool)
        mask[0, seen] = True
        probs = torch.softmax(penalize(logits[None], mask, 1.2) / 0.7, -1)
        kept = top_p_filter(probs, 0.9)[0]
        return kept / kept.sum()

    def check(tokens, want):
        freq = torch.bincount(tokens, minlength=len(want)).double() / len(tokens)
        assert (want[tokens] > 0).all()  # nothing outside the nucleus
        assert ((freq - want).abs() <= 4 * (want * (1 - want) / len(tokens)).sqrt() + 1e-3).all()

    check(got[:, 0], expected(prompt, []).double())
    firsts = got[:, 0][got[:, 0] != tok.eot_id]
    first = torch.bincount(firsts).argmax().item()  # the likeliest first token that does not end the answer
    check(got[got[:, 0] == first, 1], expected(prompt + [first], [first]).double())
