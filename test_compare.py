"""compare.py: blind annotation, resume, a judge model over HTTP (a loopback stub), both orders, ratings,
the report's numbers and its figures."""
import fcntl
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
GRADES = {"EXCELLENT": "Excellent", "PASSABLE": "Pass"}  # the stub judge rates by them, Fail without


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
    """The rows of a jsonl that compare.py wrote: lines end at a newline only (U+2028 stands raw in a line)."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n")[:-1]]


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
    assert "ana, 4 of 10 judged: " in r.stdout and "skipped 1." in r.stdout  # the skip is no judgment
    r = run("1\n" * 10)  # the skipped item is asked again, in its place
    assert "4 judged before, 6 to go" in r.stdout and "[5/10]" in r.stdout and "[4/10]" not in r.stdout
    assert re.findall(r"\] =+\n(prompt \d+)\n", r.stdout) == [f"prompt {i}" for i in (2, 5, 6, 7, 8, 9)]
    js = judgments(tmp_path / "j.jsonl")
    assert [j["prompt"] for j in js] == [f"prompt {i}" for i in (0, 1, 2, 3, 4, 2, 5, 6, 7, 8, 9)]
    assert [j["label"] for j in js][2] == "skip" and js[5]["label"] == js[5]["first"]
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


def test_a_skipped_item_is_asked_again_and_counts_once_by_its_verdict(tmp_path):
    a = write_answers(tmp_path / "a.jsonl", [f"alpha {i}" for i in range(3)])
    b = write_answers(tmp_path / "b.jsonl", [f"beta {i}" for i in range(3)])
    run = lambda keys: compare(a, b, "--out", "j.jsonl", "--annotator", "ana", input=keys, cwd=tmp_path)
    r = run("s\n1\n2\n")
    assert r.returncode == 0 and "ana, 2 of 3 judged: " in r.stdout and "skipped 1." in r.stdout
    r = run("t\n")
    assert "2 judged before, 1 to go" in r.stdout and "3 of 3 judged: " in r.stdout and "skipped 0." in r.stdout
    assert re.findall(r"\] =+\n(prompt \d+)\n", r.stdout) == ["prompt 0"]  # only the skipped one
    assert [(j["prompt"], j["label"]) for j in judgments(tmp_path / "j.jsonl")][::3] == [("prompt 0", "skip"),
                                                                                        ("prompt 0", "tie")]
    assert "3 judged before, 0 to go" in run("").stdout
    _, [s] = report("j.jsonl", tmp_path)
    assert s["n"] == 3 and s["tie"] == round(1 / 3, 4)
    assert sum(s["annotators"]["ana"].values()) == 3 and "skip" not in s["annotators"]["ana"]  # judged, not skipped
    # ratings alike: the skipped answer is asked again, and counted by its rating
    rate_file(tmp_path, n=2)
    rate = lambda keys: compare("--rate", "lima.jsonl", "--out", "r.jsonl", "--sample", 0, "--annotator", "ana",
                                input=keys, cwd=tmp_path)
    assert "2 prompts, 0 rated before, 2 to go" in rate("s\ne\n").stdout
    r = rate("p\n")
    assert "2 prompts, 1 rated before, 1 to go" in r.stdout
    assert "2 of 2 rated: Fail 0, Pass 1, Excellent 1" in r.stdout
    _, [s] = report("r.jsonl", tmp_path)
    assert (s["n"], s["pass"], s["annotators"]) == (2, 0.5, {"ana": {"Pass": 1, "Excellent": 1}})


# -----------------------------------------------------------------------------
# A judge model: a stub OpenAI-compatible server on the loopback interface


class Judge(BaseHTTPRequestHandler):
    mode, requests, garbage = "mark", [], ["Verdict: 1 or 2", "Answer 1 is significantly better.", "Verdict:"]
    delay = 0  # seconds before each reply
    gate = None  # a threading.Event: each reply waits until it is set
    preamble, joint = "Both fine.", "\n"  # the reply's content: preamble, joint, then the verdict line
    body = None  # bytes: the reply's whole body instead of a chat completion
    sent = []  # "drip" and "huge": the bytes of each body sent before the client hung up

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Judge.requests.append((self.path, self.headers.get("Authorization"), body))
        if Judge.mode == "500":
            return self.send_error(500)
        if Judge.mode in ("drip", "huge"):
            return self.stream()
        if Judge.mode == "slow":
            time.sleep(1.5)
        if Judge.gate:
            Judge.gate.wait(30)
        time.sleep(Judge.delay)
        text = body["messages"][0]["content"]
        if "[Answer 1]" in text:
            one, two = text.split("[Answer 1]")[1].split("[Answer 2]")
            verdict = "Verdict: 1" if MARK in one and MARK not in two else \
                "Verdict: 2" if MARK in two and MARK not in one else "Verdict: neither"
            if Judge.mode == "first":  # position bias at its worst: the answer shown first wins
                verdict = "Verdict: 1"
        else:  # a rating of one answer
            answer = text.split("[Answer]\n")[1].split("\n\n[End]")[0]
            verdict = "Rating: " + next((g for m, g in GRADES.items() if m in answer), "Fail")
        if Judge.mode == "garbage":
            verdict = Judge.garbage[len(Judge.requests) % 3]
        asked = sum(text == t["messages"][0]["content"] for _, _, t in Judge.requests)
        if Judge.mode == "garbage_once" and asked == 1:
            verdict = "I prefer the first one."
        message = {"role": "assistant", "content": f"{Judge.preamble}{Judge.joint}**{verdict}**"}
        reply = Judge.body or json.dumps({"choices": [{"message": message}]}).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(reply)
        except OSError:  # the client gave up waiting ("slow")
            pass

    def stream(self):
        """Headers at once, then a body of spaces that comes a byte a second ("drip": 100 bytes) or is 64 MiB
        ("huge"), until the client hangs up."""
        size, chunk, pause = (100, b" ", 1) if Judge.mode == "drip" else (64 << 20, b" " * (1 << 20), 0)
        sent = 0
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            while sent < size:
                self.wfile.write(chunk)
                sent += len(chunk)
                time.sleep(pause)
        except OSError:  # the client hung up
            pass
        Judge.sent.append(sent)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Judge.mode, Judge.requests, Judge.delay, Judge.body, Judge.sent = "mark", [], 0, None, []
    Judge.preamble, Judge.joint, Judge.gate = "Both fine.", "\n", None
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


def test_judge_dripping_its_reply_is_given_up_at_the_timeout(tmp_path, judge):
    a, b = judge_files(tmp_path, n=2)
    Judge.mode = "drip"  # the headers at once, then a byte a second: every read is quick, the reply never ends
    start = time.monotonic()
    r = compare(a, b, "--out", "j.jsonl", "--judge", judge, "--judge_model", "m", "--timeout", 2, cwd=tmp_path)
    assert time.monotonic() - start < 6 and r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"error: judge {judge}/v1/chat/completions: no reply within --timeout "
                                             "2 s; 0 of 2 judged, rerun to continue"]
    assert not (tmp_path / "j.jsonl").read_text()


def test_judge_reply_over_4_mb_is_an_unparseable_verdict_read_no_further(tmp_path, judge):
    a, b = judge_files(tmp_path, n=1)
    Judge.mode = "huge"  # a 64 MiB body, streamed
    r = compare(a, b, "--out", "j.jsonl", "--judge", judge, "--judge_model", "m", cwd=tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    warning = f"warning: judge {judge}/v1/chat/completions: a reply over 4 MB, taken as an unparseable verdict"
    assert r.stderr.strip().splitlines() == [warning] * 3  # asked three times, as any unparseable verdict
    assert [j["label"] for j in judgments(tmp_path / "j.jsonl")] == ["unparsed"] * 3
    deadline = time.time() + 10
    while len(Judge.sent) < 3 and time.time() < deadline:  # the server notices the hang-up
        time.sleep(0.02)
    assert len(Judge.sent) == 3 and max(Judge.sent) < 32 << 20  # 4 MiB read, the rest never sent


@pytest.mark.parametrize("body", [
    {"choices": [{"message": {"content": 42}}]},
    {"choices": [{"message": {"content": ["Verdict: 1"]}}]},
    {"choices": [{"message": {"content": None}}]},
    {"choices": [{"message": {}}]},
    {"choices": []},
    {"choices": "Verdict: 1"},
    [1, 2],
    "Verdict: 1",
    "deep",
])
def test_judge_reply_without_a_string_content_is_an_unparseable_verdict(tmp_path, judge, body):
    a, b = judge_files(tmp_path, n=1)
    Judge.body = ("[" * 100_000 + "]" * 100_000 if body == "deep" else json.dumps(body)).encode()
    r = compare(a, b, "--out", "j.jsonl", "--judge", judge, "--judge_model", "m", cwd=tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    warning = f"warning: judge {judge}/v1/chat/completions: a reply without a string as content, taken as an " \
              "unparseable verdict"
    assert r.stderr.strip().splitlines() == [warning] * 3
    assert [(j["label"], j["reply"]) for j in judgments(tmp_path / "j.jsonl")] == [("unparsed", "")] * 3


def test_u2028_and_u0085_in_answers_and_replies_are_no_line_breaks(tmp_path, judge):
    """sample.py writes --output with ensure_ascii=False: U+2028, U+2029 and U+0085 stand raw inside a line, and
    so they do in the judgments, which keep the judge's reply."""
    prompts = ["Tea\u2028time?", "Plan\x85a trip.", "Why\u2029not?"]
    for path, word, marked in (("a.jsonl", "alpha", 0), ("b.jsonl", "beta", 1)):
        rows = [{"prompt": p, "response": f"{word}\u2028{i}\x85" + (MARK if i == marked else ""), "tokens": 3,
                 "stopped_at_eot": True} for i, p in enumerate(prompts)]
        (tmp_path / path).write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows),
                                     encoding="utf-8")
    Judge.preamble = "Both\u2028fine\x85."
    run = lambda: compare("a.jsonl", "b.jsonl", "--out", "j.jsonl", "--judge", judge, "--judge_model", "m",
                          cwd=tmp_path)
    r = run()
    assert r.returncode == 0 and "0 judged before, 3 to go" in r.stdout, r.stderr
    text = (tmp_path / "j.jsonl").read_text(encoding="utf-8")
    assert "\u2028" in text and "\x85" in text and text.count("\n") == 3
    js = judgments(tmp_path / "j.jsonl")
    assert [(j["prompt"], j["label"]) for j in js] == list(zip(prompts, ["A", "B", "tie"]))
    assert all(j["reply"].startswith("Both\u2028fine\x85.\n**Verdict: ") for j in js)
    assert "3 judged before, 0 to go" in run().stdout and len(Judge.requests) == 3
    _, [s] = report("j.jsonl", tmp_path)
    assert (s["n"], s["a_better"], s["tie"], s["b_better"]) == (3, 0.3333, 0.3333, 0.3333)
    # a verdict line ends at "\n": "Verdict: 1" after a U+2028 is not on a line of its own, and is not taken
    Judge.joint = "\u2028"
    r = compare("a.jsonl", "b.jsonl", "--out", "j.jsonl", "--judge", judge, "--judge_model", "m2", cwd=tmp_path)
    assert r.returncode == 0 and [j["label"] for j in judgments(tmp_path / "j.jsonl")[3:]] == ["unparsed"] * 9


def test_a_lone_surrogate_in_an_answers_file_is_judged_and_written_back_as_its_escape(tmp_path, judge):
    """A hand-made answers file may hold the escape of a lone surrogate (no UTF-8 can encode it): the judgment
    line keeps that escape, and reads back as the same prompt."""
    for path, response in (("a.jsonl", "x"), ("b.jsonl", "y" + MARK)):
        row = {"prompt": "Tea\ud800?", "response": response, "tokens": 3, "stopped_at_eot": True}
        (tmp_path / path).write_text(json.dumps(row) + "\n")  # ASCII: the surrogate as \\ud800
    r = compare("a.jsonl", "b.jsonl", "--out", "j.jsonl", "--judge", judge, "--judge_model", "m", cwd=tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "Tea\\ud800?" in (tmp_path / "j.jsonl").read_text(encoding="utf-8")
    [j] = judgments(tmp_path / "j.jsonl")
    assert (j["prompt"], j["label"]) == ("Tea\ud800?", "B")


# -----------------------------------------------------------------------------
# --out: one writer, whole lines


def test_a_second_run_on_the_same_out_is_refused_while_the_first_holds_it(tmp_path, judge):
    a, b = judge_files(tmp_path, n=4)
    Judge.gate = threading.Event()  # the judge keeps the first run waiting until the others are refused
    cmd = [sys.executable, str(ROOT / "compare.py"), a, b, "--out", "j.jsonl", "--judge", judge,
           "--judge_model", "m"]
    first = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 20
    while not Judge.requests and time.time() < deadline:  # the first has --out and waits on the judge
        time.sleep(0.02)
    refusal = ["error: --out j.jsonl: another compare.py is writing there; wait for it or give another --out"]
    try:
        for who in ("ana", "m"):  # a person, and the same judge again
            r = compare(a, b, "--out", "j.jsonl", "--annotator", who, input="1\n" * 4, cwd=tmp_path)
            assert (r.returncode, r.stderr.strip().splitlines(), r.stdout) == (1, refusal, "")
    finally:
        Judge.gate.set()
    assert first.wait(timeout=30) == 0, first.stderr.read()
    first.stderr.close()
    js = judgments(tmp_path / "j.jsonl")
    assert [(j["annotator"], j["label"]) for j in js] == [("m", "A"), ("m", "B"), ("m", "tie"), ("m", "A")]
    # a lock held by another process refuses a rating run too, and leaves the file as it was, a torn tail and all
    torn = (tmp_path / "j.jsonl").read_bytes() + b'{"a": "a.jsonl", "b": "b.js'
    (tmp_path / "j.jsonl").write_bytes(torn)
    rate_file(tmp_path, n=2)
    with open(tmp_path / "j.jsonl", "ab") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = compare("--rate", "lima.jsonl", "--out", "j.jsonl", "--sample", 0, input="p\np\n", cwd=tmp_path)
        assert (r.returncode, r.stderr.strip().splitlines(), r.stdout) == (1, refusal, "")
    assert (tmp_path / "j.jsonl").read_bytes() == torn


def test_a_cut_short_last_line_is_dropped_and_the_rerun_continues(tmp_path):
    a = write_answers(tmp_path / "a.jsonl", [f"alpha {i}" for i in range(4)])
    b = write_answers(tmp_path / "b.jsonl", [f"beta {i}" for i in range(4)])
    run = lambda keys: compare(a, b, "--out", "j.jsonl", "--annotator", "ana", input=keys, cwd=tmp_path)
    assert run("1\n1\n1\n").returncode == 0
    lines = (tmp_path / "j.jsonl").read_bytes().split(b"\n")[:3]
    cut = lines[2][:-9]  # a run killed in the middle of writing its third judgment
    (tmp_path / "j.jsonl").write_bytes(lines[0] + b"\n" + lines[1] + b"\n" + cut)
    r = run("2\n2\n")
    assert r.returncode == 0 and r.stderr.startswith(f"j.jsonl: dropping a cut-short last line ({len(cut)} bytes)")
    assert "2 judged before, 2 to go" in r.stdout
    kept = (tmp_path / "j.jsonl").read_bytes()
    assert kept.startswith(lines[0] + b"\n" + lines[1] + b"\n{") and kept.endswith(b"\n")
    js = judgments(tmp_path / "j.jsonl")
    assert [j["prompt"] for j in js] == [f"prompt {i}" for i in range(4)]
    assert [j["label"] for j in js[2:]] == [{"A": "B", "B": "A"}[j["first"]] for j in js[2:]]


def test_full_disk_leaves_whole_lines_and_the_rerun_continues(tmp_path, judge):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    try:
        a, b = judge_files(tmp_path, n=6)
        Judge.preamble = "x" * 20_000  # judgments of 20 kB: three fit in 64 kB, the fourth in part
        out = disk / "j.jsonl"
        run = lambda: compare(a, b, "--out", out, "--judge", judge, "--judge_model", "m", cwd=tmp_path)
        r = run()
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert r.stderr.strip().splitlines() == [f"error: --out {out}: cannot write to it (No space left on "
                                                 "device); rerun to continue"]
        kept = out.read_bytes()
        assert kept.endswith(b"\n") and len(judgments(out)) == 3  # the torn fourth line is undone
        subprocess.run(["mount", "-o", "remount,size=1m", str(disk)], check=True)
        r = run()
        assert r.returncode == 0 and "3 judged before, 3 to go" in r.stdout, r.stderr
        assert out.read_bytes().startswith(kept)
        assert [j["label"] for j in judgments(out)] == ["A", "B", "tie"] * 2
    finally:
        subprocess.run(["umount", str(disk)])


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


def test_a_100000_deep_json_line_is_one_line_naming_file_and_line(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    write_answers(tmp_path / "a.jsonl", ["r"], ["p"])
    judgment = json.dumps({"a": "a.jsonl", "b": "b.jsonl", "annotator": "ana", "prompt": "p", "first": "A",
                           "label": "A"})
    rating = json.dumps({"answers": "a.jsonl", "annotator": "ana", "prompt": "p", "rating": "Pass"})
    cases = [  # (the file, its first line, the command, what line 2 should be)
        ("b.jsonl", '{"prompt": "p", "response": "r"}', ["a.jsonl", "b.jsonl", "--out", "j.jsonl"],
         'a JSON object with "prompt"'),
        ("j.jsonl", judgment, ["a.jsonl", "a.jsonl", "--out", "j.jsonl"], "a judgment"),  # resumed
        ("j.jsonl", judgment, ["--report", "j.jsonl"], "a judgment"),
        ("r.jsonl", rating, ["--rate", "a.jsonl", "--sample", 0, "--out", "r.jsonl"], "a rating"),
        ("r.jsonl", rating, ["--report", "r.jsonl"], "a rating"),
        ("j.jsonl", None, ["--report", "j.jsonl"], "a judgment"),  # the line that tells judgments from ratings
    ]
    for name, first, command, what in cases:
        text = f"{first}\n{deep}\n" if first else f"{deep}\n"
        (tmp_path / name).write_text(text)
        r = compare(*command, input="1\n", cwd=tmp_path)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-500:]
        [line] = r.stderr.strip().splitlines()
        assert line.startswith(f"error: {name}:{2 if first else 1}: expected {what}"), line
        assert (tmp_path / name).read_text() == text
        (tmp_path / name).unlink()


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


# -----------------------------------------------------------------------------
# Both orders (MT-Bench's rule): each item judged twice, the answers swapped


def both_orders(tmp_path, judge, n=30, out="j.jsonl"):
    a, b = judge_files(tmp_path, n)
    r = compare(a, b, "--out", out, "--judge", judge, "--judge_model", "stub", "--both_orders", "--seed", 1,
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    return r, judgments(tmp_path / out)


def test_both_orders_judge_that_prefers_the_first_shown_ties_everything_and_never_agrees(tmp_path, judge):
    Judge.mode = "first"
    r, js = both_orders(tmp_path, judge)
    assert len(js) == 60 and len(Judge.requests) == 60 and all(j["both_orders"] for j in js)
    assert sorted((j["prompt"], j["first"]) for j in js) == sorted((f"prompt {i}", f) for i in range(30)
                                                                   for f in "AB")
    assert all(j["label"] == j["first"] for j in js)  # what the judge said: the first shown, always
    assert "30 of 30 judged in both orders: a.jsonl better 0, tie 30, b.jsonl better 0" in r.stdout
    text, [s] = report("j.jsonl", tmp_path)
    assert (s["n"], s["a_better"], s["tie"], s["b_better"]) == (30, 0.0, 1.0, 0.0)
    assert s["both_orders"] == {"items": 30, "agreed": 0, "agreement": 0.0}
    assert (s["first_won"], s["decided"], s["position_bias"]) == (60, 60, 1.0)
    assert "the two verdicts agreed on 0 of 30 items (0.0%)" in text
    assert "=" * 60 in text  # the bar: all tie


def test_both_orders_judge_that_prefers_the_marked_answer_gives_the_truth_and_always_agrees(tmp_path, judge):
    r, js = both_orders(tmp_path, judge)
    # the first pass shows every item once, the second pass swapped, after all the others
    assert [j["prompt"] for j in js] == [f"prompt {i}" for i in range(30)] * 2
    assert [j["first"] for j in js[30:]] == [{"A": "B", "B": "A"}[j["first"]] for j in js[:30]]
    truth = ["A", "B", "tie"] * 10
    assert [j["label"] for j in js[:30]] == [j["label"] for j in js[30:]] == truth
    assert "30 of 30 judged in both orders: a.jsonl better 10, tie 10, b.jsonl better 10" in r.stdout
    text, [s] = report("j.jsonl", tmp_path)
    assert (s["n"], s["a_better"], s["tie"], s["b_better"]) == (30, 0.3333, 0.3333, 0.3333)
    assert s["both_orders"] == {"items": 30, "agreed": 30, "agreement": 1.0}
    assert "the two verdicts agreed on 30 of 30 items (100.0%)" in text
    r = compare("a.jsonl", "b.jsonl", "--out", "j.jsonl", "--judge", judge, "--judge_model", "stub",
                "--both_orders", cwd=tmp_path)
    assert "30 prompts in both orders, 60 judged before, 0 to go" in r.stdout and len(Judge.requests) == 60


def test_both_orders_for_a_person_each_item_twice_apart_and_resumed(tmp_path):
    a = write_answers(tmp_path / "a.jsonl", [f"alpha {i}" for i in range(5)])
    b = write_answers(tmp_path / "b.jsonl", [f"beta {i}" for i in range(5)])
    run = lambda keys: compare(a, b, "--out", "j.jsonl", "--annotator", "ana", "--both_orders", input=keys,
                               cwd=tmp_path)
    r = run("1\n" * 4)  # the end of input after 4 of the 10 showings, while the 5th is shown
    assert "0 judged before, 10 to go" in r.stdout and "[5/10]" in r.stdout and "[6/10]" not in r.stdout
    r = run("1\n" * 10)
    assert "4 judged before, 6 to go" in r.stdout and "[5/10]" in r.stdout
    asked = re.findall(r"\] =+\n(prompt \d+)\n", r.stdout)
    assert asked == ["prompt 4", "prompt 0", "prompt 1", "prompt 2", "prompt 3", "prompt 4"]
    js = judgments(tmp_path / "j.jsonl")
    assert [j["prompt"] for j in js] == [f"prompt {i}" for i in range(5)] * 2  # each shown twice, 5 apart
    assert sorted((j["prompt"], j["first"]) for j in js) == sorted((f"prompt {i}", f) for i in range(5)
                                                                   for f in "AB")
    # always key 1: the answer shown first, so the two orders never agree: all ties
    assert "5 of 5 judged in both orders: a.jsonl better 0, tie 5, b.jsonl better 0" in r.stdout
    assert report("j.jsonl", tmp_path)[1][0]["both_orders"] == {"items": 5, "agreed": 0, "agreement": 0.0}


def test_both_orders_refused_where_the_annotator_judged_in_one_order(tmp_path):
    a = write_answers(tmp_path / "a.jsonl", ["alpha"], ["p"])
    b = write_answers(tmp_path / "b.jsonl", ["beta"], ["p"])
    assert compare(a, b, "--out", "j.jsonl", "--annotator", "ana", input="1\n", cwd=tmp_path).returncode == 0
    before = (tmp_path / "j.jsonl").read_text()
    r = compare(a, b, "--out", "j.jsonl", "--annotator", "ana", "--both_orders", input="1\n1\n", cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "error: --out j.jsonl: ana judged a.jsonl vs b.jsonl in one order before: keep to that, or give "
        "another --annotator"]
    assert (tmp_path / "j.jsonl").read_text() == before
    r = compare(a, b, "--out", "j.jsonl", "--annotator", "bob", "--both_orders", input="1\n1\n", cwd=tmp_path)
    assert r.returncode == 0 and len(judgments(tmp_path / "j.jsonl")) == 3


# -----------------------------------------------------------------------------
# Ratings: LIMA's absolute analysis, Fail / Pass / Excellent


def rate_file(tmp_path, n=30):
    """Answer i: Excellent (i % 3 == 0), Pass (i % 3 == 1) or Fail, by the stub judge's markers."""
    grades = ["EXCELLENT", "PASSABLE", "plain"]
    return write_answers(tmp_path / "lima.jsonl", [f"answer {i} {grades[i % 3]}" for i in range(n)])


def truth(prompt):
    return ["Excellent", "Pass", "Fail"][int(prompt.split()[1]) % 3]


def rate(tmp_path, judge, *flags, out="r.jsonl"):
    return compare("--rate", "lima.jsonl", "--out", out, "--judge", judge, "--judge_model", "stub", *flags,
                   cwd=tmp_path)


def test_judge_ratings_come_out_as_the_known_shares(tmp_path, judge):
    rate_file(tmp_path)
    r = rate(tmp_path, judge, "--sample", 0)
    assert r.returncode == 0, r.stderr
    rs = judgments(tmp_path / "r.jsonl")
    assert [x["prompt"] for x in rs] == [f"prompt {i}" for i in range(30)]  # --sample 0: all, in order
    assert all(x["rating"] == truth(x["prompt"]) for x in rs) and {x["answers"] for x in rs} == {"lima.jsonl"}
    assert "lima.jsonl" not in Judge.requests[0][2]["messages"][0]["content"]  # blind to the model's name
    assert "30 of 30 rated: Fail 10, Pass 10, Excellent 10, skipped 0" in r.stdout
    text, [s] = report("r.jsonl", tmp_path)
    assert (s["answers"], s["n"], s["fail"], s["pass"], s["excellent"]) == ("lima.jsonl", 30, 0.3333, 0.3333,
                                                                            0.3333)
    assert s["by_annotator"] == {"stub": {"n": 30, "fail": 0.3333, "pass": 0.3333, "excellent": 0.3333}}
    for k in ("fail", "pass", "excellent"):
        lo, hi = s["ci95"][k]
        assert 0 < lo < 1 / 3 < hi < 1
    # LIMA's 50 of 300: a seeded draw, the same on a rerun, another with another seed
    prompts = [f"prompt {i}" for i in range(300)]
    write_answers(tmp_path / "lima.jsonl", [f"answer {i} {['EXCELLENT', 'PASSABLE', 'x'][i % 3]}"
                                            for i in range(300)], prompts)
    drawn = []
    for seed, out in ((None, "s1.jsonl"), (None, "s2.jsonl"), (0, "s3.jsonl"), (7, "s4.jsonl")):
        r = rate(tmp_path, judge, *(["--seed", seed] if seed is not None else []), out=out)
        assert r.returncode == 0 and "50 prompts, 0 rated before, 50 to go" in r.stdout
        drawn.append([x["prompt"] for x in judgments(tmp_path / out)])
    assert drawn[0] == drawn[1] == drawn[2] != drawn[3]  # no --seed is seed 0
    assert all(len(set(d)) == 50 and d == sorted(d, key=prompts.index) for d in drawn)  # file order
    text, [s] = report("s4.jsonl", tmp_path)
    want = [sum(truth(p) == g for p in drawn[3]) / 50 for g in ("Fail", "Pass", "Excellent")]
    assert [s["fail"], s["pass"], s["excellent"]] == [round(w, 4) for w in want]


def test_ratings_resume_after_a_kill_and_each_sampled_answer_is_rated_once(tmp_path, judge):
    rate_file(tmp_path, n=40)
    Judge.delay = 0.1
    cmd = [sys.executable, str(ROOT / "compare.py"), "--rate", "lima.jsonl", "--out", "r.jsonl", "--judge", judge,
           "--judge_model", "stub", "--sample", 20]
    p = subprocess.Popen(list(map(str, cmd)), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out, deadline = tmp_path / "r.jsonl", time.time() + 30
    while (not out.exists() or len(out.read_text().splitlines()) < 5) and time.time() < deadline:
        time.sleep(0.02)
    p.kill()
    p.wait()
    k = len(judgments(out))
    assert 5 <= k < 20
    Judge.delay = 0
    r = rate(tmp_path, judge, "--sample", 20)
    assert r.returncode == 0 and f"20 prompts, {k} rated before, {20 - k} to go" in r.stdout
    rs = judgments(out)
    assert len(rs) == 20 and len({x["prompt"] for x in rs}) == 20  # each sampled answer exactly once
    assert all(x["rating"] == truth(x["prompt"]) for x in rs)
    assert len(Judge.requests) <= 21  # none asked twice but the one in flight at the kill


def test_ratings_unparseable_verdicts_retried_twice_never_guessed(tmp_path, judge):
    rate_file(tmp_path, n=3)
    Judge.mode = "garbage"
    assert rate(tmp_path, judge, "--sample", 0).returncode == 0
    assert [x["rating"] for x in judgments(tmp_path / "r.jsonl")] == ["unparsed"] * 9
    assert "3 rated before, 0 to go" in rate(tmp_path, judge, "--sample", 0).stdout and len(Judge.requests) == 9
    Judge.mode, Judge.requests = "garbage_once", []
    (tmp_path / "r.jsonl").unlink()
    assert rate(tmp_path, judge, "--sample", 0).returncode == 0
    rs = judgments(tmp_path / "r.jsonl")
    assert [x["rating"] for x in rs] == ["unparsed", "Excellent", "unparsed", "Pass", "unparsed", "Fail"]


def test_a_person_rates_blind_keys_and_skip(tmp_path):
    rate_file(tmp_path, n=4)
    r = compare("--rate", "lima.jsonl", "--out", "r.jsonl", "--sample", 0, "--annotator", "ana",
                input="e\nx\np\ns\nf\n", cwd=tmp_path)
    assert r.returncode == 0 and "lima.jsonl" not in r.stdout.split("Summary:")[0]  # blind to the file
    assert "Excellent: it meets them and is as good as or better than what an expert would write" in r.stdout
    assert [x["rating"] for x in judgments(tmp_path / "r.jsonl")] == ["Excellent", "Pass", "skip", "Fail"]
    assert "3 of 4 rated: Fail 1, Pass 1, Excellent 1, skipped 1" in r.stdout


def test_ratings_report_arithmetic_on_a_hand_made_file(tmp_path):
    ana = {"p0": "Excellent", "p1": "Pass", "p2": "Fail", "p3": "Excellent", "p4": "skip", "p5": "Pass"}
    bob = {"p0": "Excellent", "p1": "Fail", "p2": "Fail", "p3": "Pass"}
    rows = [{"answers": "lima.jsonl", "annotator": w, "prompt": p, "rating": g}
            for w, d in (("ana", ana), ("bob", bob)) for p, g in d.items()]
    rows.append({"answers": "lima.jsonl", "annotator": "bob", "prompt": "p3", "rating": "Excellent"})  # last counts
    rows.append({"answers": "base.jsonl", "annotator": "ana", "prompt": "p0", "rating": "Fail"})
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    text, (s, base) = report("r.jsonl", tmp_path, "--seed", 2)
    # ana E P F E P, bob E F F E: 9 ratings, Fail 3, Pass 2, Excellent 4
    assert (s["n"], s["fail"], s["pass"], s["excellent"]) == (9, round(3 / 9, 4), round(2 / 9, 4), round(4 / 9, 4))
    assert s["by_annotator"] == {"ana": {"n": 5, "fail": 0.2, "pass": 0.4, "excellent": 0.4},
                                 "bob": {"n": 4, "fail": 0.5, "pass": 0.0, "excellent": 0.5}}
    # shared p0..p3: E/E, P/F, F/F, E/E -> 3 of 4 the same
    assert s["agreement"] == [{"annotators": ["ana", "bob"], "items": 4, "agreement": 0.75}]
    assert s["annotators"] == {"ana": {"Excellent": 2, "Pass": 2, "Fail": 1, "skip": 1},  # each item once:
                               "bob": {"Excellent": 2, "Fail": 2}}  # p3 by its last rating
    assert (base["answers"], base["n"], base["fail"], base["ci95"]["fail"]) == ("base.jsonl", 1, 1.0, [1.0, 1.0])
    assert report("r.jsonl", tmp_path, "--seed", 2)[1][0]["ci95"] == s["ci95"]  # seeded
    assert "agreement ana - bob: 75.0% on 4 shared items (the same rating)" in text
    assert report("r.jsonl", tmp_path, "--annotator", "bob")[1][0]["n"] == 4


# -----------------------------------------------------------------------------
# The figures: the PNG read back


def png(path):
    """The picture as (height, width, 3) integers 0-255."""
    image = pytest.importorskip("matplotlib.image").imread(path)
    return (image[..., :3] * 255).round().astype(int)


def color_mask(pixels, colors):
    """Where a pixel is one of colors (#rrggbb), give or take antialiasing's last few levels."""
    import numpy as np

    masks = [np.abs(pixels - [int(c[i:i + 2], 16) for i in (1, 3, 5)]).max(-1) <= 3 for c in colors]
    return np.logical_or.reduce(masks)


def runs(line, shortest=10):
    """(start, end) of each run of True in a 1-D boolean array, at least shortest long (antialiased
    text has some pixels of the bars' grey)."""
    found, start = [], None
    for i, on in enumerate(list(line) + [False]):
        if on and start is None:
            start = i
        if not on and start is not None:
            found.append((start, i))
            start = None
    return [(a, b) for a, b in found if b - a >= shortest]


PAIR_COLORS = {"A": "#55a868", "tie": "#b0b0b0", "B": "#c44e52"}  # compare.py's
RATING_COLORS = {"Fail": "#c44e52", "Pass": "#4c72b0", "Excellent": "#55a868"}


def test_plot_figure_1_one_stacked_bar_per_pair_with_the_shares(tmp_path):
    pytest.importorskip("matplotlib")
    # (a, b, labels): shares 2/4 1/4 1/4, 1/4 0 3/4, 1/5 3/5 1/5
    pairs = [("lima.jsonl", "gpt4.jsonl", "A A tie B"), ("lima.jsonl", "bard.jsonl", "A B B B"),
             ("lima.jsonl", "davinci.jsonl", "A tie tie tie B")]
    rows = [{"a": a, "b": b, "annotator": "ana", "prompt": f"p{i}", "first": "A", "label": label}
            for a, b, labels in pairs for i, label in enumerate(labels.split())]
    (tmp_path / "j.jsonl").write_text("".join(json.dumps(j) + "\n" for j in rows))
    r = compare("--report", "j.jsonl", "--plot", "fig1.png", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "wrote fig1.png: Figure 1, 3 pairs of files"
    pixels = png(tmp_path / "fig1.png")
    assert pixels.shape == (330, 800, 3)  # 8 x (1.5 + 0.6 per pair) inches at 100 dpi
    assert (pixels.min(-1) < 250).mean() > 0.2  # not blank
    bars = color_mask(pixels, PAIR_COLORS.values())
    left = min(x for x in range(pixels.shape[1]) if runs(bars[:, x]))  # the bars start at 0%
    spans = runs(bars[:, left + 2])
    assert len(spans) == 3  # one bar per pair
    expected = [(2 / 4, 1 / 4, 1 / 4), (1 / 4, 0, 3 / 4), (1 / 5, 3 / 5, 1 / 5)]
    for (top, bottom), shares in zip(spans, expected):  # top to bottom in the file's order
        row = top + (bottom - top) // 5  # above the labels written in the middle
        widths = [color_mask(pixels[row], [c]).sum() for c in PAIR_COLORS.values()]
        assert [w / sum(widths) for w in widths] == pytest.approx(shares, abs=0.02)


def test_plot_figure_3_three_bars_per_answer_file(tmp_path):
    pytest.importorskip("matplotlib")
    grades = "Fail Pass Pass Excellent Excellent Excellent".split()  # 1/6, 2/6, 3/6
    rows = [{"answers": "lima.jsonl", "annotator": "ana", "prompt": f"p{i}", "rating": g}
            for i, g in enumerate(grades)]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    r = compare("--report", "r.jsonl", "--plot", "fig3.png", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    pixels = png(tmp_path / "fig3.png")
    assert pixels.shape == (400, 500, 3) and (pixels.min(-1) < 250).mean() > 0.1
    bars = color_mask(pixels, RATING_COLORS.values())
    bottom = max(y for y in range(pixels.shape[0]) if runs(bars[y]))  # the bars stand on 0%
    spans = runs(bars[bottom - 2])
    assert len(spans) == 3
    heights = [bars[:, (a + b) // 2].sum() for a, b in spans]
    assert [h / heights[-1] for h in heights] == pytest.approx([1 / 3, 2 / 3, 1], abs=0.02)
    colors = [tuple(pixels[bottom - 2, (a + b) // 2]) for a, b in spans]  # Fail, Pass, Excellent in order
    assert colors == [tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) for c in RATING_COLORS.values()]
    rows += [{**x, "answers": "base.jsonl"} for x in rows]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    assert compare("--report", "r.jsonl", "--plot", "fig3.png", cwd=tmp_path).returncode == 0
    pixels = png(tmp_path / "fig3.png")
    bars = color_mask(pixels, RATING_COLORS.values())
    bottom = max(y for y in range(pixels.shape[0]) if runs(bars[y]))
    assert pixels.shape == (400, 700, 3) and len(runs(bars[bottom - 2])) == 6  # two files: six bars


def test_plot_without_matplotlib_says_what_to_install(tmp_path):
    blocker = tmp_path / "blocker" / "matplotlib"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    good = json.dumps({"a": "x", "b": "y", "annotator": "ana", "prompt": "p", "first": "A", "label": "A"})
    (tmp_path / "j.jsonl").write_text(good + "\n")
    env = {**os.environ, "PYTHONPATH": str(blocker.parent)}
    r = compare("--report", "j.jsonl", "--plot", "fig.png", cwd=tmp_path, env=env)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == ["error: --plot needs matplotlib: pip install "
                                                                   "matplotlib"]
    assert r.stdout == "" and not (tmp_path / "fig.png").exists()
    r = compare("--report", "j.jsonl", cwd=tmp_path, env=env)  # imported only with --plot
    assert r.returncode == 0 and '"n": 1' in r.stdout


@pytest.mark.parametrize("flags, message", [
    (["--sample", 60], "error: --sample 60: lima.jsonl answers 4 prompts"),
    (["--sample", -1], "error: --sample must be >= 0, got -1"),
    (["--both_orders"], "error: --both_orders swaps the two answers of a pair: not with --rate or --report"),
    (["--plot", "fig.png"], "error: --plot goes with --report"),
])
def test_bad_rating_flags(tmp_path, flags, message):
    rate_file(tmp_path, n=4)
    (tmp_path / "r.jsonl").write_text(json.dumps({"answers": "lima.jsonl", "annotator": "ana", "prompt": "prompt 0",
                                                  "rating": "Pass"}) + "\n")
    before = (tmp_path / "r.jsonl").read_text()
    r = compare("--rate", "lima.jsonl", "--out", "r.jsonl", "--annotator", "ana", *flags, input="p\n" * 4,
                cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [message] and "Traceback" not in r.stderr
    assert (tmp_path / "r.jsonl").read_text() == before  # nothing rated before is lost


@pytest.mark.parametrize("line", ['{"answers": "x", "annotator": "ana", "prompt": "p", "rating": "Good"}',
                                  '{"answers": "x", "annotator": "ana", "prompt": "p", "rat',
                                  '{"a": "x", "b": "y", "annotator": "ana", "prompt": "p", "first": "A", '
                                  '"label": "A"}'])
def test_bad_ratings_file(tmp_path, line):
    rate_file(tmp_path, n=2)
    good = json.dumps({"answers": "lima.jsonl", "annotator": "ana", "prompt": "prompt 0", "rating": "Pass"})
    (tmp_path / "r.jsonl").write_text(f"{good}\n{line}\n")
    before = (tmp_path / "r.jsonl").read_text()
    for r in (compare("--report", "r.jsonl", cwd=tmp_path),
              compare("--rate", "lima.jsonl", "--out", "r.jsonl", "--sample", 0, input="p\np\n", cwd=tmp_path)):
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert r.stderr.strip().splitlines() == ['error: r.jsonl:2: expected a rating: JSON with "answers", '
                                                 '"annotator", "prompt" and "rating" (\'Fail\', \'Pass\', '
                                                 "'Excellent', 'skip', 'unparsed')"]
    assert (tmp_path / "r.jsonl").read_text() == before


def test_bad_plot_paths(tmp_path):
    pytest.importorskip("matplotlib")
    good = json.dumps({"a": "x", "b": "y", "annotator": "ana", "prompt": "p", "first": "A", "label": "A"})
    (tmp_path / "j.jsonl").write_text(good + "\n")
    (tmp_path / "taken.png").mkdir()
    for path, message in [("missing/fig.png", "error: --plot missing/fig.png: no directory missing"),
                          ("taken.png", "error: --plot taken.png: cannot write it ("),
                          ("fig.xyz", "error: --plot fig.xyz: cannot write it (")]:
        r = compare("--report", "j.jsonl", "--plot", path, cwd=tmp_path)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith(message), r.stderr
    assert (tmp_path / "j.jsonl").read_text() == good + "\n"
