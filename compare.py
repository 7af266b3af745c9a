"""
LIMA's evaluation (LIMA §4.1): one prompt and two models' answers, shown in random order, and an annotator
says which is better or that neither is significantly better. The annotator is a person at the terminal or a
judge model behind an OpenAI-compatible API (LIMA's Figure 2 used GPT-4); --report draws Figure 1's bars.

$ python compare.py lima.jsonl base.jsonl --out judgments.jsonl --annotator ana     # you judge, key by key
$ python compare.py lima.jsonl base.jsonl --out judgments.jsonl --judge http://localhost:8000 --judge_model M
$ python compare.py --report judgments.jsonl
"""
import argparse
import getpass
import json
import os
import random
import re
import statistics
import sys
import urllib.error
import urllib.request
from collections import Counter
from itertools import accumulate
from pathlib import Path

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("answers", nargs="*", metavar="A.jsonl B.jsonl", help="two answer files, jsonl with "
                    '"prompt" and "response" (what sample.py --prompts writes), matched by prompt')
parser.add_argument("--out", help="judgments.jsonl: every judgment is appended at once; a rerun continues")
parser.add_argument("--annotator", help="your name (default: the login name; with --judge: the judge "
                    "model's); with --report: only this annotator's judgments")
parser.add_argument("--seed", type=int, help="seed for the order of the answers (and --report's bootstrap)")
parser.add_argument("--judge", metavar="URL", help="an OpenAI-compatible server (http://host:port, .../v1 or "
                    ".../v1/chat/completions) that judges instead of you; the key comes from OPENAI_API_KEY")
parser.add_argument("--judge_model", metavar="NAME", help="the model the judge server runs")
parser.add_argument("--timeout", type=float, default=120, help="seconds to wait for the judge (%(default)s)")
parser.add_argument("--report", metavar="JUDGMENTS", help="summarise a judgments.jsonl")
parser.add_argument("--bootstrap", type=int, default=1000, help="resamples for 95%% intervals (%(default)s)")
args = parser.parse_args()
if args.report and args.answers or not args.report and (len(args.answers) != 2 or not args.out):
    parser.error("give A.jsonl B.jsonl --out JUDGMENTS.jsonl, or --report JUDGMENTS.jsonl")
if (args.judge is None) != (args.judge_model is None):
    parser.error("--judge URL and --judge_model NAME go together")
if args.judge and not args.judge.startswith(("http://", "https://")):
    parser.error(f"--judge must be an http:// or https:// URL, got {args.judge}")
for ok, flag, want in [(args.timeout > 0, "timeout", "> 0"), (args.bootstrap >= 2, "bootstrap", ">= 2")]:
    if not ok:
        sys.exit(f"error: --{flag} must be {want}, got {getattr(args, flag)}")
LABELS = ("A", "tie", "B", "skip", "unparsed")  # the file judged better, neither, or no judgment
TRIES = 3  # a judge's unparseable verdict is retried at most twice, never guessed
STATS = ("a_better", "tie", "b_better", "a_as_good_or_better")


def read_jsonl(path, valid, what):
    """The JSON objects of a jsonl file; one error line naming file:line for anything else."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        sys.exit(f"error: {path}: no such file")
    except (OSError, UnicodeDecodeError) as e:
        sys.exit(f"error: {path}: cannot read it as UTF-8 text ({e})")
    rows = []
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not (isinstance(row, dict) and valid(row)):
            sys.exit(f"error: {path}:{n}: expected {what}")
        rows.append(row)
    return rows


def is_judgment(j):
    return all(isinstance(j.get(k), str) for k in ("a", "b", "annotator", "prompt")) \
        and j.get("first") in ("A", "B") and j.get("label") in LABELS


JUDGMENT = f'a judgment: JSON with "a", "b", "annotator", "prompt", "first" ("A"/"B") and "label" {LABELS}'

if args.report:
    rows = read_jsonl(args.report, is_judgment, JUDGMENT)
    rows = [j for j in rows if args.annotator in (None, j["annotator"])]
    if not rows:
        sys.exit(f"error: {args.report}: no judgments" + (f" by {args.annotator}" if args.annotator else ""))
    rng, summaries = random.Random(args.seed or 0), []
    for a, b in dict.fromkeys((j["a"], j["b"]) for j in rows):  # each pair of files, in order of appearance
        pair = [j for j in rows if (j["a"], j["b"]) == (a, b)]
        final = {(j["annotator"], j["prompt"]): j for j in pair if j["label"] in ("A", "B", "tie")}
        labels = [j["label"] for j in final.values()]
        n = len(labels)
        print(f"\n{a} (A) vs {b} (B): {n} judgments")
        if not n:
            continue

        def shares(labels):  # Figure 1's three parts, and LIMA's headline: "as good or better"
            c = Counter(labels)
            return [c["A"] / n, c["tie"] / n, c["B"] / n, (c["A"] + c["tie"]) / n]

        point = shares(labels)
        resampled = list(zip(*(shares(rng.choices(labels, k=n)) for _ in range(args.bootstrap))))
        ci = [(q[0], q[-1]) for q in (statistics.quantiles(r, n=40) for r in resampled)]  # 2.5% and 97.5%
        cuts = [round(60 * s) for s in accumulate(point[:3])]
        print("  " + "".join(c * (hi - lo) for c, lo, hi in zip("#=-", [0] + cuts, cuts)) +
              f"  A better {point[0]:.0%} | tie {point[1]:.0%} | B better {point[2]:.0%}")
        for name, p, (lo, hi) in zip(("A better", "tie", "B better", "A as good or better"), point, ci):
            print(f"  {name:<20} {p:6.1%}   95% interval {lo:6.1%} - {hi:6.1%}")
        counts = {}
        for j in pair:
            counts.setdefault(j["annotator"], Counter())[j["label"]] += 1
        print("  annotators: " + "; ".join(f"{who} " + ", ".join(f"{k} {c[k]}" for k in LABELS if c[k])
                                           for who, c in counts.items()))
        agreement = []  # LIMA §4.1: 1 for the same label, 0.5 when exactly one says tie, 0 otherwise
        for x in counts:
            for y in [y for y in counts if y > x]:
                both = [(j["label"], final[y, p]["label"]) for (w, p), j in final.items()
                        if w == x and (y, p) in final]
                if both:
                    score = sum(1 if u == v else 0.5 if "tie" in (u, v) else 0 for u, v in both) / len(both)
                    agreement.append({"annotators": [x, y], "items": len(both), "agreement": round(score, 4)})
                    print(f"  agreement {x} - {y}: {score:.1%} on {len(both)} shared items (tie-discounted)")
        decided = [j for j in final.values() if j["label"] != "tie"]
        first_won = sum(j["label"] == j["first"] for j in decided)
        bias = first_won / len(decided) if decided else None
        if decided:  # an annotator without position bias prefers the first-shown answer half the time
            print(f"  position bias: the answer shown first won {first_won} of {len(decided)} ({bias:.1%})")
        summaries.append({"a": a, "b": b, "n": n, **{k: round(p, 4) for k, p in zip(STATS, point)},
                          "ci95": {k: [round(lo, 4), round(hi, 4)] for k, (lo, hi) in zip(STATS, ci)},
                          "annotators": {w: dict(c) for w, c in counts.items()}, "agreement": agreement,
                          "first_won": first_won, "decided": len(decided),
                          "position_bias": None if bias is None else round(bias, 4)})
    print("\n".join(json.dumps(s, ensure_ascii=False) for s in summaries))  # for scripts: one line per pair
    sys.exit(0)

# Annotate: the two files' answers to the same prompts
A, B = args.answers
answers = []
for path in (A, B):
    rows = read_jsonl(path, lambda r: isinstance(r.get("prompt"), str) and isinstance(r.get("response"), str),
                      'a JSON object with "prompt" and "response" strings')
    answers.append({})
    for r in rows:
        answers[-1].setdefault(r["prompt"], r["response"])  # a prompt answered twice: its first answer
shared = [p for p in answers[0] if p in answers[1]]
if not shared:
    sys.exit(f"error: {A} and {B} answer no prompt in common")
for path, mine in zip((A, B), answers):
    if len(mine) > len(shared):
        print(f"{path}: {len(mine) - len(shared)} prompts not in the other file, skipped", file=sys.stderr)
out = Path(args.out)
if not out.parent.is_dir():
    sys.exit(f"error: --out {out}: no directory {out.parent}")
annotator = args.annotator or args.judge_model or getpass.getuser()
past = [j for j in (read_jsonl(out, is_judgment, JUDGMENT) if out.exists() else [])
        if (j["a"], j["b"], j["annotator"]) == (A, B, annotator)]
unparsed = Counter(j["prompt"] for j in past if j["label"] == "unparsed")
judged = {j["prompt"]: j["label"] for j in past if j["label"] != "unparsed"}
todo = [p for p in shared if p not in judged and unparsed[p] < TRIES]  # resume: only what is still to judge
print(f"{annotator}: {len(shared)} prompts, {len(shared) - len(todo)} judged before, {len(todo)} to go")

if args.judge:
    url = args.judge.rstrip("/")
    url += "" if url.endswith("/chat/completions") else "/chat/completions" if url.endswith("/v1") else \
        "/v1/chat/completions"
    key = os.environ.get("OPENAI_API_KEY")
    # LIMA §4.1 and its appendix: the judge gets the people's instructions: imagine needing help with the
    # prompt, say which answer serves better, or that neither is significantly better
    INSTRUCTION = ("Imagine that you need help with the question below and that you asked two AI assistants. "
                   "Which answer better satisfies your needs? Judge the whole answer (does it do what was "
                   "asked, is it correct, helpful and well written); the order in which they appear means "
                   "nothing.\n\n[Question]\n{}\n\n[Answer 1]\n{}\n\n[Answer 2]\n{}\n\n[End]\nCompare the two "
                   "answers, then end with one line that is exactly one of:\nVerdict: 1\nVerdict: 2\n"
                   "Verdict: neither\n(1 or 2: that answer is significantly better; neither: neither is "
                   "significantly better than the other)")


def ask_judge(prompt, shown):
    """The judge's reply to one item; a network or server failure ends the run (a rerun continues)."""
    body = {"model": args.judge_model, "messages": [{"role": "user",
                                                     "content": INSTRUCTION.format(prompt, *shown)}]}
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, json.dumps(body).encode(), headers),
                                    timeout=args.timeout) as r:
            return json.loads(r.read())["choices"][0]["message"]["content"] or ""
    except urllib.error.HTTPError as e:
        why = f"HTTP {e.code} {e.reason}"
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        timed_out = isinstance(reason, TimeoutError)
        why = f"no reply within --timeout {args.timeout:g} s" if timed_out else str(reason)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        why = "the reply is not an OpenAI chat completion"
    sys.exit(f"error: judge {url}: {why}; {len(judged)} of {len(shared)} judged, rerun to continue")


try:
    import termios
    import tty
except ImportError:  # Windows: Enter after each key
    termios = None


def read_key():
    """One key press at a terminal; one line from a pipe or file (scripts, tests). 'q' at the end of input."""
    if termios and sys.stdin.isatty():
        fd = sys.stdin.fileno()
        old = termios.tcgetattr(fd)
        try:
            tty.setcbreak(fd, termios.TCSANOW)  # keys without Enter, typed-ahead keys kept; Ctrl-C works
            key = sys.stdin.read(1)
        finally:
            termios.tcsetattr(fd, termios.TCSADRAIN, old)
        print(key)
        return "q" if key in ("", "\x04") else key.lower()
    line = sys.stdin.readline()
    return line.strip().lower() if line else "q"


rng = random.Random(args.seed)
try:
    with open(out, "a", encoding="utf-8") as f:
        for i, prompt in enumerate(todo):
            first = rng.choice("AB")  # LIMA §4.1: the two answers in random order, drawn anew for every item
            shown = [answers[0][prompt], answers[1][prompt]][:: 1 if first == "A" else -1]
            progress = f"[{len(shared) - len(todo) + i + 1}/{len(shared)}]"
            for _ in range(TRIES - unparsed[prompt] if args.judge else 1):
                if args.judge:
                    reply = ask_judge(prompt, shown)
                    lines = [line.strip(" *`") for line in reply.strip().splitlines()] or [""]
                    m = re.fullmatch(r"verdict:\s*(1|2|neither)\.?", lines[-1], re.I)  # strict: never a guess
                    key = {"1": "1", "2": "2", "neither": "t"}[m.group(1).lower()] if m else None
                    extra = {"judge": args.judge_model, "reply": reply}
                else:
                    print(f"\n{'=' * 30} {progress} {'=' * 30}\n{prompt}\n"
                          f"{'-' * 14} 1 {'-' * 14}\n{shown[0]}\n{'-' * 14} 2 {'-' * 14}\n{shown[1]}\n")
                    key, extra = None, {}
                    while key not in ("1", "2", "t", "s", "q"):
                        print("better: 1 or 2; t: neither is significantly better; s: skip; q: quit > ",
                              end="", flush=True)
                        key = read_key()
                    if key == "q":
                        raise KeyboardInterrupt
                other = "B" if first == "A" else "A"
                label = {"1": first, "2": other, "t": "tie", "s": "skip", None: "unparsed"}[key]
                f.write(json.dumps({"a": A, "b": B, "annotator": annotator, "prompt": prompt, "first": first,
                                    "label": label, **extra}, ensure_ascii=False) + "\n")
                f.flush()  # at once: an interrupted run loses no judgment
                if args.judge:
                    print(f"{progress} {'unparseable verdict' if key is None else 'judged'}")
                if key is not None:
                    judged[prompt] = label
                    break
except KeyboardInterrupt:  # q, Ctrl-C or the end of input: everything judged is already in --out
    print("\nstopped; rerun the same command to continue", file=sys.stderr)
c = Counter(judged.values())  # only now the annotator learns which file was which
print(f"\n{annotator}, {len(judged)} of {len(shared)} judged: {A} better {c['A']}, tie {c['tie']}, "
      f"{B} better {c['B']}, skipped {c['skip']}. Summary: python compare.py --report {out}")
