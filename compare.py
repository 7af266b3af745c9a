"""
LIMA's evaluation (LIMA §4.1): one prompt and two models' answers, shown in random order, and an
annotator says which is better or that neither is significantly better. The annotator is a person at
the terminal or a judge model behind an OpenAI-compatible API (LIMA's Figure 2 used GPT-4); --report
draws Figure 1's bars.

$ python compare.py lima.jsonl base.jsonl --out judgments.jsonl --annotator ana  # you, key by key
$ python compare.py lima.jsonl base.jsonl --out judgments.jsonl --judge URL --judge_model M
$ python compare.py --report judgments.jsonl

The answer files are jsonl with "prompt" and "response" (what sample.py --prompts writes),
matched by prompt. Every judgment is appended to --out at once, and a rerun continues. The
annotator defaults to the login name, with --judge to the judge model's; with --report,
--annotator keeps only that annotator's judgments. --judge takes http://host:port, .../v1 or
.../v1/chat/completions; the key comes from OPENAI_API_KEY. The report's 95% intervals come
from --bootstrap resamples of the judgments.
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

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("answers", nargs="*", metavar="A.jsonl B.jsonl", help="two answer files")
parser.add_argument("--out", help="judgments.jsonl, appended to at once; a rerun continues")
parser.add_argument("--annotator", help="your name (default: the login name or the judge model)")
parser.add_argument("--seed", type=int, help="seed for the order of the answers and the bootstrap")
parser.add_argument("--judge", metavar="URL", help="an OpenAI-compatible judge server")
parser.add_argument("--judge_model", metavar="NAME", help="the model the judge server runs")
parser.add_argument("--timeout", type=float, default=120, help="seconds for a reply (%(default)s)")
parser.add_argument("--report", metavar="JUDGMENTS", help="summarise a judgments.jsonl")
parser.add_argument("--bootstrap", type=int, default=1000, help="resamples (%(default)s)")
args = parser.parse_args()

reporting = args.report and not args.answers
annotating = not args.report and len(args.answers) == 2 and args.out
if not (reporting or annotating):
    sys.exit("error: give A.jsonl B.jsonl --out JUDGMENTS.jsonl, or --report JUDGMENTS.jsonl")
if (args.judge is None) != (args.judge_model is None):
    sys.exit("error: --judge URL and --judge_model NAME go together")
if args.judge and not args.judge.startswith(("http://", "https://")):
    sys.exit(f"error: --judge must be an http:// or https:// URL, got {args.judge}")
if not args.timeout > 0:  # written this way round, NaN is refused too
    sys.exit(f"error: --timeout must be > 0, got {args.timeout}")
if args.bootstrap < 2:
    sys.exit(f"error: --bootstrap must be >= 2, got {args.bootstrap}")

LABELS = ("A", "tie", "B", "skip", "unparsed")  # the file judged better, neither, or no judgment
TRIES = 3  # a judge's unparseable verdict is retried at most twice, never guessed
STATS = {"a_better": "A better", "tie": "tie", "b_better": "B better",  # JSON key: printed name
         "a_as_good_or_better": "A as good or better"}
JUDGMENT = ('a judgment: JSON with "a", "b", "annotator", "prompt", "first" ("A"/"B") '
            f'and "label" {LABELS}')
ANSWER = 'a JSON object with "prompt" and "response" strings'


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


def is_judgment(row):
    return (all(isinstance(row.get(k), str) for k in ("a", "b", "annotator", "prompt"))
            and row.get("first") in ("A", "B")
            and row.get("label") in LABELS)


def is_answer(row):
    return all(isinstance(row.get(k), str) for k in ("prompt", "response"))


# -----------------------------------------------------------------------------
# The report


def shares(labels):
    """Figure 1's three parts, and LIMA's headline: A better, tie, B better, A as good or better."""
    n = len(labels)
    count = Counter(labels)
    parts = [count[label] / n for label in ("A", "tie", "B")]
    return parts + [(count["A"] + count["tie"]) / n]  # as good or better: A or tie


def text_bar(point):
    """Figure 1's bar in 60 characters: # A better, = tie, - B better."""
    a_end, tie_end, b_end = (round(60 * share) for share in accumulate(point[:3]))
    return "#" * a_end + "=" * (tie_end - a_end) + "-" * (b_end - tie_end)


def tie_discounted(u, v):
    """LIMA §4.1's agreement on one item: 1 for the same label, 0.5 when exactly one is tie."""
    if u == v:
        return 1
    if "tie" in (u, v):
        return 0.5
    return 0


def agreements(final, annotators):
    """Prints the agreement of every two annotators on the items both judged; returns it."""
    rows = []
    for x in annotators:
        for y in annotators:
            if y <= x:  # each two annotators once
                continue
            both = [(j["label"], final[y, p]["label"]) for (who, p), j in final.items()
                    if who == x and (y, p) in final]
            if not both:
                continue
            score = sum(tie_discounted(u, v) for u, v in both) / len(both)
            print(f"  agreement {x} - {y}: {score:.1%} on {len(both)} shared items "
                  "(tie-discounted)")
            rows.append({"annotators": [x, y], "items": len(both), "agreement": round(score, 4)})
    return rows


def report_pair(a, b, pair, rng):
    """Prints one pair of files' part of the report; returns its summary (None: no verdicts)."""
    # an annotator's last verdict on an item is the one that counts; skips and unparsed are none
    final = {(j["annotator"], j["prompt"]): j for j in pair if j["label"] in ("A", "B", "tie")}
    labels = [j["label"] for j in final.values()]
    n = len(labels)
    print(f"\n{a} (A) vs {b} (B): {n} judgments")
    if not n:
        return None
    point = shares(labels)
    # 95% bootstrap intervals: resample the judgments, keep the 2.5% and 97.5% points
    resampled = [shares(rng.choices(labels, k=n)) for _ in range(args.bootstrap)]
    quantiles = [statistics.quantiles(values, n=40) for values in zip(*resampled)]
    ci = [(q[0], q[-1]) for q in quantiles]
    print(f"  {text_bar(point)}  "
          f"A better {point[0]:.0%} | tie {point[1]:.0%} | B better {point[2]:.0%}")
    for name, share, (lo, hi) in zip(STATS.values(), point, ci):
        print(f"  {name:<20} {share:6.1%}   95% interval {lo:6.1%} - {hi:6.1%}")
    counts = {}
    for j in pair:
        counts.setdefault(j["annotator"], Counter())[j["label"]] += 1
    per_annotator = []  # ana A 3, tie 2; bob B 1
    for who, count in counts.items():
        listed = ", ".join(f"{label} {count[label]}" for label in LABELS if count[label])
        per_annotator.append(f"{who} {listed}")
    print(f"  annotators: {'; '.join(per_annotator)}")
    agreement = agreements(final, counts)
    decided = [j for j in final.values() if j["label"] != "tie"]
    first_won = sum(j["label"] == j["first"] for j in decided)
    bias = None
    if decided:  # an annotator without position bias prefers the first-shown answer half the time
        share = first_won / len(decided)
        print(f"  position bias: the answer shown first won {first_won} of {len(decided)} "
              f"({share:.1%})")
        bias = round(share, 4)
    return {"a": a, "b": b, "n": n,
            **{k: round(share, 4) for k, share in zip(STATS, point)},
            "ci95": {k: [round(lo, 4), round(hi, 4)] for k, (lo, hi) in zip(STATS, ci)},
            "annotators": counts,  # Counters: JSON objects
            "agreement": agreement,
            "first_won": first_won,
            "decided": len(decided),
            "position_bias": bias}


if args.report:
    rows = read_jsonl(args.report, is_judgment, JUDGMENT)
    rows = [j for j in rows if args.annotator in (None, j["annotator"])]
    if not rows:
        by = f" by {args.annotator}" if args.annotator else ""
        sys.exit(f"error: {args.report}: no judgments{by}")
    rng = random.Random(args.seed or 0)
    pairs = {}  # each pair of files' judgments, in order of appearance
    for j in rows:
        pairs.setdefault((j["a"], j["b"]), []).append(j)
    summaries = []
    for (a, b), pair in pairs.items():
        summary = report_pair(a, b, pair, rng)
        if summary:
            summaries.append(json.dumps(summary, ensure_ascii=False))
    print("\n".join(summaries))  # for scripts: one line per pair
    sys.exit(0)

# -----------------------------------------------------------------------------
# Annotate: the two files' answers to the same prompts

A, B = args.answers
answers = []
for path in args.answers:
    responses = {}
    for row in read_jsonl(path, is_answer, ANSWER):
        responses.setdefault(row["prompt"], row["response"])  # answered twice: the first answer
    answers.append(responses)
shared = [p for p in answers[0] if p in answers[1]]
if not shared:
    sys.exit(f"error: {A} and {B} answer no prompt in common")
for path, responses in zip(args.answers, answers):
    if len(responses) > len(shared):
        print(f"{path}: {len(responses) - len(shared)} prompts not in the other file, skipped",
              file=sys.stderr)
out = Path(args.out)
if not out.parent.is_dir():
    sys.exit(f"error: --out {out}: no directory {out.parent}")
annotator = args.annotator or args.judge_model or getpass.getuser()
past = read_jsonl(out, is_judgment, JUDGMENT) if out.exists() else []
past = [j for j in past if (j["a"], j["b"], j["annotator"]) == (A, B, annotator)]
unparsed = Counter(j["prompt"] for j in past if j["label"] == "unparsed")
judged = {j["prompt"]: j["label"] for j in past if j["label"] != "unparsed"}
todo = [p for p in shared if p not in judged and unparsed[p] < TRIES]  # resume: only what is left
print(f"{annotator}: {len(shared)} prompts, {len(shared) - len(todo)} judged before, "
      f"{len(todo)} to go")

# LIMA §4.1 and its appendix: the judge gets the people's instructions: imagine needing help with
# the prompt, say which answer serves better, or that neither is significantly better
INSTRUCTION = ("Imagine that you need help with the question below and that you asked two AI "
               "assistants. Which answer better satisfies your needs? Judge the whole answer "
               "(does it do what was asked, is it correct, helpful and well written); the order "
               "in which they appear means nothing.\n\n"
               "[Question]\n{}\n\n"
               "[Answer 1]\n{}\n\n"
               "[Answer 2]\n{}\n\n"
               "[End]\n"
               "Compare the two answers, then end with one line that is exactly one of:\n"
               "Verdict: 1\n"
               "Verdict: 2\n"
               "Verdict: neither\n"
               "(1 or 2: that answer is significantly better; neither: neither is significantly "
               "better than the other)")
KEYS = "better: 1 or 2; t: neither is significantly better; s: skip; q: quit > "


def ask_judge(prompt, shown):
    """The judge's reply to one item; a network or server failure ends the run (a rerun resumes)."""
    message = {"role": "user", "content": INSTRUCTION.format(prompt, *shown)}
    body = {"model": args.judge_model, "messages": [message]}
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as response:
            return json.loads(response.read())["choices"][0]["message"]["content"] or ""
    except urllib.error.HTTPError as e:
        why = f"HTTP {e.code} {e.reason}"
    except OSError as e:  # urllib.error.URLError is one
        reason = getattr(e, "reason", e)
        why = str(reason)
        if isinstance(reason, TimeoutError):
            why = f"no reply within --timeout {args.timeout:g} s"
    except (ValueError, LookupError, TypeError, AttributeError):
        why = "the reply is not an OpenAI chat completion"
    sys.exit(f"error: judge {url}: {why}; {len(judged)} of {len(shared)} judged, rerun to continue")


def parse_verdict(reply):
    """The verdict on the reply's last line, "Verdict: 1", "2" or "neither"; None for all else."""
    lines = reply.strip().splitlines() or [""]
    last = lines[-1].strip(" *`")  # markdown around it is allowed
    verdict = re.fullmatch(r"verdict:\s*(1|2|neither)\.?", last, re.I)  # strict: never a guess
    return verdict.group(1).lower() if verdict else None


try:
    import termios
    import tty
except ImportError:  # Windows: Enter after each key
    termios = None


def read_key():
    """One key press at a terminal, one line from a pipe or file (scripts, tests); 'q' at the end"""
    if termios and sys.stdin.isatty():
        fd = sys.stdin.fileno()
        old = termios.tcgetattr(fd)
        try:
            tty.setcbreak(fd, termios.TCSANOW)  # no Enter, typed-ahead keys kept; Ctrl-C works
            key = sys.stdin.read(1)
        finally:
            termios.tcsetattr(fd, termios.TCSADRAIN, old)
        print(key)
        return "q" if key in ("", "\x04") else key.lower()  # "": the end of input; \x04: Ctrl-D
    line = sys.stdin.readline()
    return line.strip().lower() if line else "q"


def ask_person(prompt, shown, progress):
    """The key a person pressed for one item: 1, 2, t or s; q and the end of input stop the run."""
    print(f"\n{'=' * 30} {progress} {'=' * 30}\n{prompt}\n"
          f"{'-' * 14} 1 {'-' * 14}\n{shown[0]}\n"
          f"{'-' * 14} 2 {'-' * 14}\n{shown[1]}\n")
    key = None
    while key not in ("1", "2", "t", "s", "q"):
        print(KEYS, end="", flush=True)
        key = read_key()
    if key == "q":
        raise KeyboardInterrupt  # stops as Ctrl-C does
    return key


if args.judge:
    url = args.judge.rstrip("/")
    if not url.endswith("/chat/completions"):  # http://host:port or .../v1
        url += "/chat/completions" if url.endswith("/v1") else "/v1/chat/completions"
    api_key = os.environ.get("OPENAI_API_KEY")
rng = random.Random(args.seed)
try:
    with open(out, "a", encoding="utf-8") as f:
        for i, prompt in enumerate(todo):
            # LIMA §4.1: the two answers in random order, drawn anew for every item
            first, second = rng.choice(("AB", "BA"))
            shown = [answers[0][prompt], answers[1][prompt]]
            if first == "B":
                shown.reverse()
            # the key pressed or the judge's verdict, mapped back to the files
            label_of = {"1": first, "2": second, "t": "tie", "neither": "tie", "s": "skip",
                        None: "unparsed"}
            progress = f"[{len(shared) - len(todo) + i + 1}/{len(shared)}]"
            tries = TRIES - unparsed[prompt] if args.judge else 1  # a person is asked once
            for _ in range(tries):
                if args.judge:
                    reply = ask_judge(prompt, shown)
                    key = parse_verdict(reply)
                    extra = {"judge": args.judge_model, "reply": reply}
                else:
                    key = ask_person(prompt, shown, progress)
                    extra = {}
                label = label_of[key]
                judgment = {"a": A, "b": B, "annotator": annotator, "prompt": prompt,
                            "first": first, "label": label, **extra}
                f.write(json.dumps(judgment, ensure_ascii=False) + "\n")
                f.flush()  # at once: an interrupted run loses no judgment
                if args.judge:
                    print(f"{progress} {'judged' if key else 'unparseable verdict'}")
                if key is not None:
                    judged[prompt] = label
                    break
except KeyboardInterrupt:  # q, Ctrl-C or the end of input: everything judged is already in --out
    print("\nstopped; rerun the same command to continue", file=sys.stderr)
count = Counter(judged.values())  # only now the annotator learns which file was which
print(f"\n{annotator}, {len(judged)} of {len(shared)} judged: {A} better {count['A']}, "
      f"tie {count['tie']}, {B} better {count['B']}, skipped {count['skip']}. "
      f"Summary: python compare.py --report {out}")
