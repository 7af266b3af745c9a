"""compare.py: blind annotation, resume, a judge model over HTTP (a loopback stub), the report's numbers."""
import json
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).parent
MARK = "ZEBRA"  # the stub judge prefers the answer that contains it


def compare(*args, cwd, input="", env=None):
    return subprocess.run([sys.executable, str(ROOT / "compare.py"), *map(str, args)], cwd=cwd, input=input,
                          capture_output=True, text=True, env=env, timeout=60)


def write_answers(path, responses, prompts=None):
    """sample.py --prompts' output layout."""
    prompts = prompts or [f"prompt {i}" for i in range(len(responses))]
    rows = [{"prompt": p, "response": r, "tokens": 3, "stopped_at_eot": True}
            for p, r in zip(prompts, responses)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path.name


def judgments(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def report(path, cwd, *flags):
    r = compare("--report", path, *flags, cwd=cwd)
    assert r.returncode == 0, r.stderr
    return r.stdout, [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


# -----------------------------------------------------------------------------
# People at the terminal


@pytest.mark.parametrize("key", ["1", "2"])
def test_order_is_balanced_and_label_maps_back_to_the_shown_file(tmp_path, key):
    n = 200
    a = write_answers(tmp_path / "a.jsonl", [f"alpha {i}" for i in range(n)])
    b = write_answers(tmp_path / "b.jsonl", [f"beta {i}" for i in range(n)])
    r = compare(a, b, "--out", "j.jsonl", "--seed", 0, "--annotator", "ana", input=f"{key}\n" * n,
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    js = judgments(tmp_path / "j.jsonl")
    assert [j["prompt"] for j in js] == [f"prompt {i}" for i in range(n)]
    shown_first = re.findall(r"\n-+ 1 -+\n(alpha|beta) (\d+)\n-+ 2 -+\n(?:alpha|beta) \d+\n", r.stdout)
    assert [int(i) for _, i in shown_first] == list(range(n))
    for j, (word, _) in zip(js, shown_first):  # what was on screen as 1 is the file recorded as first
        assert j["first"] == {"alpha": "A", "beta": "B"}[word] and j["annotator"] == "ana"
        assert j["label"] == (j["first"] if key == "1" else {"A": "B", "B": "A"}[j["first"]])
    n_a = sum(j["first"] == "A" for j in js)
    assert 85 <= n_a <= 115, n_a  # fair coin per item: 100 ± 2.1 standard deviations
    n_better = n_a if key == "1" else n - n_a  # revealed only at the end
    assert f"a.jsonl better {n_better}, tie 0, b.jsonl better {n - n_better}" in r.stdout.splitlines()[-1]


def test_keys_and_resume_after_quit_and_end_of_input(tmp_path):
    a = write_answers(tmp_path / "a.jsonl", [f"alpha {i}" for i in range(10)])
    b = write_answers(tmp_path / "b.jsonl", [f"beta {i}" for i in range(10)])
    run = lambda keys, who="ana": compare(a, b, "--out", "j.jsonl", "--annotator", who, input=keys,
                                          cwd=tmp_path)
    r = run("1\nx\nt\nq\n2\n")  # 'x' is asked again, 'q' stops: two judged, the '2' after it is never read
    assert r.returncode == 0 and "[3/10]" in r.stdout and "[4/10]" not in r.stdout
    js = judgments(tmp_path / "j.jsonl")
    assert [j["label"] for j in js] == [js[0]["first"], "tie"]
    r = run("s\n2\n1\n")  # end of input after three lines: stops as q does
    assert "2 judged before, 8 to go" in r.stdout and "[3/10]" in r.stdout and "[6/10]" in r.stdout
    r = run("1\n" * 10)
    assert "5 judged before, 5 to go" in r.stdout and "[6/10]" in r.stdout and "[5/10]" not in r.stdout
    js = judgments(tmp_path / "j.jsonl")
    assert sorted(j["prompt"] for j in js) == sorted(f"prompt {i}" for i in range(10))  # each exactly once
    assert [j["label"] for j in js][2] == "skip"
    assert "10 judged before, 0 to go" in run("").stdout
    assert "0 judged before, 10 to go" in run("", who="bob").stdout  # resume is per annotator


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_single_key_presses_at_a_terminal(tmp_path):
    import pty

    a = write_answers(tmp_path / "a.jsonl", [f"alpha {i}" for i in range(3)])
    b = write_answers(tmp_path / "b.jsonl", [f"beta {i}" for i in range(3)])
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, str(ROOT / "compare.py"), a, b, "--out", "j.jsonl"], cwd=tmp_path,
                         stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    os.close(slave)
    for key in "t2q":  # no Enter: each key press is the answer
        seen = ""
        while not seen.endswith("q: quit > "):
            seen += p.stdout.read(1) or pytest.fail(f"compare.py ended early: {p.communicate()}")
        os.write(master, key.encode())
    p.communicate(timeout=20)
    os.close(master)
    js = judgments(tmp_path / "j.jsonl")
    assert p.returncode == 0 and [j["label"] for j in js] == ["tie", {"A": "B", "B": "A"}[js[1]["first"]]]


def test_resume_after_the_process_is_killed(tmp_path):
    n, k = 12, 5
    a = write_answers(tmp_path / "a.jsonl", [f"alpha {i}" for i in range(n)])
    b = write_answers(tmp_path / "b.jsonl", [f"beta {i}" for i in range(n)])
    out = tmp_path / "j.jsonl"
    p = subprocess.Popen([sys.executable, str(ROOT / "compare.py"), a, b, "--out", out.name], cwd=tmp_path,
                         stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         text=True)
    p.stdin.write("t\n" * k)
    p.stdin.flush()  # stdin stays open: the process waits for judgment k + 1
    deadline = time.time() + 20
    while (not out.exists() or len(out.read_text().splitlines()) < k) and time.time() < deadline:
        time.sleep(0.02)
    p.kill()
    p.wait()
    p.stdin.close()
    assert len(judgments(out)) == k
    r = compare(a, b, "--out", out.name, input="1\n" * n, cwd=tmp_path)
    assert f"{k} judged before, {n - k} to go" in r.stdout
    asked = re.findall(r"\] =+\n(prompt \d+)\n", r.stdout)
    assert asked == [f"prompt {i}" for i in range(k, n)]  # exactly the remaining items
    js = judgments(out)
    assert [j["prompt"] for j in js] == [f"prompt {i}" for i in range(n)]
    assert [j["label"] for j in js] == ["tie"] * k + [j["first"] for j in js[k:]]


# -----------------------------------------------------------------------------
# A judge model: a stub OpenAI-compatible server on the loopback interface


class Judge(BaseHTTPRequestHandler):
    mode, requests, garbage = "mark", [], ["Verdict: 1 or 2", "Answer 1 is significantly better.", "Verdict:"]

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Judge.requests.append((self.path, self.headers.get("Authorization"), body))
        if Judge.mode == "500":
            return self.send_error(500)
        if Judge.mode == "slow":
            time.sleep(1.5)
        text = body["messages"][0]["content"]
        one, two = text.split("[Answer 1]")[1].split("[Answer 2]")
        verdict = "Verdict: 1" if MARK in one and MARK not in two else \
            "Verdict: 2" if MARK in two and MARK not in one else "Verdict: neither"
        if Judge.mode == "garbage":
            verdict = Judge.garbage[len(Judge.requests) % 3]
        asked = sum(text == t["messages"][0]["content"] for _, _, t in Judge.requests)
        if Judge.mode == "garbage_once" and asked == 1:
            verdict = "I prefer the first one."
        message = {"role": "assistant", "content": f"Both fine.\n**{verdict}**"}
        reply = json.dumps({"choices": [{"message": message}]})
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(reply.encode())
        except OSError:  # the client gave up waiting ("slow")
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def judge():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Judge.mode, Judge.requests = "mark", []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def judge_files(tmp_path, n=30):
    """Item i: the marker in A's answer (i % 3 == 0), in B's (i % 3 == 1), or in neither."""
    a = write_answers(tmp_path / "a.jsonl", [f"alpha {i}" + (MARK if i % 3 == 0 else "") for i in range(n)])
    b = write_answers(tmp_path / "b.jsonl", [f"beta {i}" + (MARK if i % 3 == 1 else "") for i in range(n)])
    return a, b


def test_judge_model_report_equals_the_truth(tmp_path, judge):
    a, b = judge_files(tmp_path)
    env = {"OPENAI_API_KEY": "sk-test", "PATH": ""}
    r = compare(a, b, "--out", "j.jsonl", "--judge", judge, "--judge_model", "stub-4", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    path, auth, body = Judge.requests[0]
    assert (path, auth, body["model"]) == ("/v1/chat/completions", "Bearer sk-test", "stub-4")
    assert "neither is significantly better" in body["messages"][0]["content"].lower()
    js = judgments(tmp_path / "j.jsonl")
    assert len(js) == 30 and {j["annotator"] for j in js} == {"stub-4"}
    text, [s] = report("j.jsonl", tmp_path)
    assert (s["n"], s["a_better"], s["tie"], s["b_better"]) == (30, 0.3333, 0.3333, 0.3333)
    assert s["a_as_good_or_better"] == 0.6667
    first_won = sum(j["label"] == j["first"] for j in js if j["label"] != "tie")
    assert (s["decided"], s["first_won"]) == (20, first_won)
    assert "#" * 20 + "=" * 20 + "-" * 20 in text  # the Figure 1 bar, 60 characters wide
    r = compare(a, b, "--out", "j.jsonl", "--judge", judge + "/v1", "--judge_model", "stub-4", cwd=tmp_path)
    assert "30 judged before, 0 to go" in r.stdout and len(Judge.requests) == 30


def test_judge_unparseable_verdicts_are_recorded_and_retried_twice_never_guessed(tmp_path, judge):
    a, b = judge_files(tmp_path, n=4)
    run = lambda: compare(a, b, "--out", "j.jsonl", "--judge", judge, "--judge_model", "m", cwd=tmp_path)
    Judge.mode = "garbage"
    assert run().returncode == 0
    js = judgments(tmp_path / "j.jsonl")
    assert [j["label"] for j in js] == ["unparsed"] * 12 and len(Judge.requests) == 12  # 1 + 2 retries each
    assert {j["reply"].splitlines()[-1] for j in js} == {f"**{g}**" for g in Judge.garbage}
    assert "4 judged before, 0 to go" in run().stdout and len(Judge.requests) == 12  # not asked again
    Judge.mode, Judge.requests = "garbage_once", []
    (tmp_path / "j.jsonl").unlink()
    assert run().returncode == 0
    js = judgments(tmp_path / "j.jsonl")
    assert [j["label"] for j in js[::2]] == ["unparsed"] * 4  # each item's first reply, then its verdict
    assert [j["label"] for j in js[1::2]] == ["A", "B", "tie", "A"]
    prompts = [f"prompt {i}" for i in range(4)]
    assert [j["prompt"] for j in js[1::2]] == [j["prompt"] for j in js[::2]] == prompts


@pytest.mark.parametrize("mode, message", [("500", "HTTP 500 Internal Server Error"),
                                           ("slow", "no reply within --timeout 0.3 s")])
def test_judge_http_error_and_timeout_stop_with_one_line_and_resume(tmp_path, judge, mode, message):
    a, b = judge_files(tmp_path, n=6)
    run = lambda: compare(a, b, "--out", "j.jsonl", "--judge", judge, "--judge_model", "m", "--timeout", 0.3,
                          cwd=tmp_path)
    Judge.mode = mode
    r = run()
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"error: judge {judge}/v1/chat/completions: {message}; "
                                             "0 of 6 judged, rerun to continue"]
    assert not (tmp_path / "j.jsonl").read_text()
    Judge.mode = "mark"
    r = run()
    assert r.returncode == 0 and "0 judged before, 6 to go" in r.stdout
    assert [j["label"] for j in judgments(tmp_path / "j.jsonl")] == ["A", "B", "tie"] * 2


# -----------------------------------------------------------------------------
# The report


def test_report_arithmetic_on_a_hand_made_file(tmp_path):
    # (annotator, prompt, first shown, label)
    ana = [("p0", "A", "A"), ("p1", "B", "A"), ("p2", "A", "tie"), ("p3", "B", "B"), ("p4", "A", "B"),
           ("p5", "B", "tie"), ("p6", "A", "A"), ("p7", "A", "skip")]
    bob = [("p0", "B", "A"), ("p1", "A", "tie"), ("p2", "B", "tie"), ("p3", "A", "A"), ("p4", "B", "B"),
           ("p7", "B", "B")]
    rows = [("ana", *x) for x in ana] + [("bob", *x) for x in bob] + [("bob", "p9", "A", "unparsed")]
    lines = [{"a": "lima.jsonl", "b": "base.jsonl", "annotator": w, "prompt": p, "first": f, "label": l}
             for w, p, f, l in rows]
    lines.append({"a": "other.jsonl", "b": "base.jsonl", "annotator": "ana", "prompt": "p0", "first": "A",
                  "label": "B"})
    (tmp_path / "j.jsonl").write_text("".join(json.dumps(j) + "\n" for j in lines))
    text, (s, other) = report("j.jsonl", tmp_path, "--seed", 3)
    # by hand: ana A A tie B B tie A (7 decided), bob A tie tie A B B (6): 13 judgments, A 5, tie 4, B 4
    assert s["n"] == 13 and (s["a_better"], s["tie"], s["b_better"]) == (round(5 / 13, 4), round(4 / 13, 4),
                                                                         round(4 / 13, 4))
    assert s["a_as_good_or_better"] == round(9 / 13, 4)
    # shared decided items p0..p4: A/A 1, A/tie 0.5, tie/tie 1, B/A 0, B/B 1 -> 3.5 / 5
    assert s["agreement"] == [{"annotators": ["ana", "bob"], "items": 5, "agreement": 0.7}]
    # non-tie judgments where the winner was shown first: ana p0 p3 p6 (not p1, p4), bob p3 p4 p7 (not p0)
    assert (s["first_won"], s["decided"], s["position_bias"]) == (6, 9, round(6 / 9, 4))
    assert s["annotators"] == {"ana": {"A": 3, "tie": 2, "B": 2, "skip": 1}, "bob": {"A": 2, "tie": 2, "B": 2,
                                                                                     "unparsed": 1}}
    for k in ("a_better", "tie", "b_better", "a_as_good_or_better"):
        lo, hi = s["ci95"][k]
        assert 0 <= lo < s[k] < hi <= 1
    assert report("j.jsonl", tmp_path, "--seed", 3)[1][0]["ci95"] == s["ci95"]  # the bootstrap is seeded
    assert (other["n"], other["b_better"], other["ci95"]["b_better"]) == (1, 1.0, [1.0, 1.0])
    cuts = [round(60 * 5 / 13), round(60 * 9 / 13)]
    assert "#" * cuts[0] + "=" * (cuts[1] - cuts[0]) + "-" * (60 - cuts[1]) + "  A better 38%" in text
    assert report("j.jsonl", tmp_path, "--annotator", "bob")[1][0]["n"] == 6


# -----------------------------------------------------------------------------
# Bad input: one line naming the file and line, no traceback


@pytest.mark.parametrize("content, message", [
    (None, "error: b.jsonl: no such file"),
    ('{"prompt": "p", "response": "r"}\n{"prompt": "q", "resp',
     'error: b.jsonl:2: expected a JSON object with "prompt" and "response" strings'),
    ('{"prompt": "p", "response": "r"}\n\n{"prompt": "q"}\n', "error: b.jsonl:2: expected"),
    ('{"prompt": "p", "response": "r"}\n{"prompt": "q", "response": null}\n', "error: b.jsonl:2: expected"),
    ('{"prompt": "elsewhere", "response": "r"}\n', "error: a.jsonl and b.jsonl answer no prompt in common"),
])
def test_bad_answer_file(tmp_path, content, message):
    write_answers(tmp_path / "a.jsonl", ["r"], ["p"])
    if content is not None:
        (tmp_path / "b.jsonl").write_text(content)
    r = compare("a.jsonl", "b.jsonl", "--out", "j.jsonl", cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith(message), r.stderr
    assert not (tmp_path / "j.jsonl").exists()


@pytest.mark.parametrize("line", ['{"a": "x"}', "not json",
                                  '{"a": "x", "b": "y", "annotator": "ana", "prompt": "p", "first": "A", '
                                  '"label": "better"}'])
def test_bad_judgments_file(tmp_path, line):
    good = json.dumps({"a": "x", "b": "y", "annotator": "ana", "prompt": "p", "first": "A", "label": "A"})
    (tmp_path / "j.jsonl").write_text(f"{good}\n{line}\n")
    r = compare("--report", "j.jsonl", cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.startswith("error: j.jsonl:2: expected a judgment")
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("flags, message", [
    (["--out", "missing/j.jsonl"], "error: --out missing/j.jsonl: no directory missing"),
    (["--out", "j.jsonl", "--judge", "localhost:8000", "--judge_model", "m"], "--judge must be an http://"),
    (["--out", "j.jsonl", "--timeout", "0"], "error: --timeout must be > 0, got 0.0"),
])
def test_bad_flags(tmp_path, flags, message):
    a = write_answers(tmp_path / "a.jsonl", ["r"], ["p"])
    r = compare(a, a, *flags, cwd=tmp_path)
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "j.jsonl").exists()
