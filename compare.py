"""
LIMA's evaluation (LIMA §4): one prompt and two models' answers, shown in random order, and an
annotator says which is better or that neither is significantly better (§4.1); or one model's
answers rated Fail, Pass or Excellent (§4.3). The annotator is a person at the terminal or a judge
model behind an OpenAI-compatible API (LIMA's Figure 2 used GPT-4); --report summarises either and
--plot draws Figure 1's bars or Figure 3's.

$ python compare.py lima.jsonl base.jsonl --out judgments.jsonl --annotator ana  # you, key by key
$ python compare.py lima.jsonl base.jsonl --out judgments.jsonl --judge URL --judge_model M
$ python compare.py lima.jsonl base.jsonl --out judgments.jsonl --judge URL --judge_model M \\
      --both_orders                                      # each item twice, the answers swapped
$ python compare.py --rate lima.jsonl --out ratings.jsonl       # 50 answers drawn at random
$ python compare.py --report judgments.jsonl --plot figure1.png
$ python compare.py --report ratings.jsonl --plot figure3.png

The answer files are jsonl with "prompt" and "response" (what sample.py --prompts writes),
matched by prompt. Every judgment and rating is appended to --out at once, and a rerun continues
(a skipped item is asked again); one run at a time writes to an --out.
The annotator defaults to the login name, with --judge to the judge model's; with --report,
--annotator keeps only that annotator's. --judge takes http://host:port, .../v1 or
.../v1/chat/completions; the key comes from OPENAI_API_KEY. --both_orders is MT-Bench's rule: a
verdict stands when the two orders agree, else it is a tie. --rate draws --sample prompts with
--seed (default 0, so that a rerun draws the same). The report's 95% intervals come from
--bootstrap resamples of the judgments; --plot needs matplotlib.
"""
import argparse
import getpass
import http.client
import json
import os
import random
import re
import statistics
import sys
import threading
import urllib.error
import urllib.request
from collections import Counter
from itertools import accumulate
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no lock on --out, one run at a time is up to you
    fcntl = None

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("answers", nargs="*", metavar="A.jsonl B.jsonl", help="two answer files")
parser.add_argument("--out", help="judgments or ratings jsonl, appended to; a rerun continues")
parser.add_argument("--annotator", help="your name (default: the login name or the judge model)")
parser.add_argument("--seed", type=int, help="seed for the order of the answers and the bootstrap")
parser.add_argument("--judge", metavar="URL", help="an OpenAI-compatible judge server")
parser.add_argument("--judge_model", metavar="NAME", help="the model the judge server runs")
parser.add_argument("--timeout", type=float, default=120, help="seconds for a reply (%(default)s)")
parser.add_argument("--both_orders", action="store_true", help="judge each item twice, swapped")
parser.add_argument("--rate", metavar="ANSWERS", help="rate one file's answers, not a pair's")
parser.add_argument("--sample", type=int, default=50, help="answers to rate (%(default)s; 0: all)")
parser.add_argument("--report", metavar="FILE", help="summarise a judgments or ratings jsonl")
parser.add_argument("--bootstrap", type=int, default=1000, help="resamples (%(default)s)")
parser.add_argument("--plot", metavar="PNG", help="with --report: draw the paper's figure")
args = parser.parse_args()

reporting = args.report and not (args.answers or args.rate)
rating = args.rate and not (args.answers or args.report) and args.out
judging = not (args.report or args.rate) and len(args.answers) == 2 and args.out
if not (reporting or rating or judging):
    sys.exit("error: give A.jsonl B.jsonl --out JUDGMENTS.jsonl, --rate ANSWERS.jsonl --out "
             "RATINGS.jsonl, or --report FILE")
if args.both_orders and not judging:
    sys.exit("error: --both_orders swaps the two answers of a pair: not with --rate or --report")
if args.plot and not args.report:
    sys.exit("error: --plot goes with --report")
if (args.judge is None) != (args.judge_model is None):
    sys.exit("error: --judge URL and --judge_model NAME go together")
if args.judge and not args.judge.startswith(("http://", "https://")):
    sys.exit(f"error: --judge must be an http:// or https:// URL, got {args.judge}")
if not args.timeout > 0:  # written this way round, NaN is refused too
    sys.exit(f"error: --timeout must be > 0, got {args.timeout}")
if args.bootstrap < 2:
    sys.exit(f"error: --bootstrap must be >= 2, got {args.bootstrap}")
if args.sample < 0:
    sys.exit(f"error: --sample must be >= 0, got {args.sample}")

LABELS = ("A", "tie", "B", "skip", "unparsed")  # the file judged better, neither, or no judgment
RATINGS = ("Fail", "Pass", "Excellent", "skip", "unparsed")  # LIMA §4.3's three, or none
VERDICTS = LABELS[:3] + RATINGS[:3]  # final: a skip is asked again, an unparsed one TRIES times
TRIES = 3  # a judge's unparseable verdict is retried at most twice, never guessed
MAX_REPLY = 4 << 20  # bytes: a chat completion is a few kB; a bigger reply is no verdict
SWAP = {"A": "B", "B": "A"}
STATS = {"a_better": "A better", "tie": "tie", "b_better": "B better",  # JSON key: printed name
         "a_as_good_or_better": "A as good or better"}
RATING_STATS = {"fail": "Fail", "pass": "Pass", "excellent": "Excellent"}
JUDGMENT = ('a judgment: JSON with "a", "b", "annotator", "prompt", "first" ("A"/"B") '
            f'and "label" {LABELS}')
RATING = f'a rating: JSON with "answers", "annotator", "prompt" and "rating" {RATINGS}'
ANSWER = 'a JSON object with "prompt" and "response" strings'
# the figures' colours, which the tests look for in the picture
COLORS = {"A": "#55a868", "tie": "#b0b0b0", "B": "#c44e52",
          "Fail": "#c44e52", "Pass": "#4c72b0", "Excellent": "#55a868"}


def read_jsonl(path, valid, what):
    """The JSON objects of a jsonl file; one error line naming file:line for anything else."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        sys.exit(f"error: {path}: no such file")
    except (OSError, UnicodeDecodeError) as e:
        sys.exit(f"error: {path}: cannot read it as UTF-8 text ({e})")
    lines = text.split("\n")  # not splitlines: sample.py writes U+2028 and U+0085 raw, in a line
    if lines[-1] == "":  # after the last line's newline
        lines.pop()
    rows = []
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):  # RecursionError: nested too deep
            row = None
        if not (isinstance(row, dict) and valid(row)):
            sys.exit(f"error: {path}:{n}: expected {what}")
        rows.append(row)
    return rows


def is_judgment(row):
    return (all(isinstance(row.get(k), str) for k in ("a", "b", "annotator", "prompt"))
            and row.get("first") in ("A", "B")
            and row.get("label") in LABELS
            and row.get("both_orders", False) in (True, False))


def is_rating(row):
    return (all(isinstance(row.get(k), str) for k in ("answers", "annotator", "prompt"))
            and row.get("rating") in RATINGS)


def is_answer(row):
    return all(isinstance(row.get(k), str) for k in ("prompt", "response"))


def read_answers(path):
    """prompt -> response of an answer file; a prompt answered twice keeps its first answer."""
    responses = {}
    for row in read_jsonl(path, is_answer, ANSWER):
        responses.setdefault(row["prompt"], row["response"])
    return responses


# -----------------------------------------------------------------------------
# The report


def pair_shares(labels):
    """Figure 1's three parts, and LIMA's headline: A better, tie, B better, A as good or better."""
    n = len(labels)
    count = Counter(labels)
    parts = [count[label] / n for label in ("A", "tie", "B")]
    return parts + [(count["A"] + count["tie"]) / n]  # as good or better: A or tie


def rating_shares(labels):
    """Figure 3's three bars: the shares of Fail, Pass and Excellent."""
    count = Counter(labels)
    return [count[label] / len(labels) for label in RATINGS[:3]]


def intervals(labels, shares, rng):
    """95% bootstrap intervals of shares(labels): resample the labels, keep 2.5% and 97.5%."""
    resampled = [shares(rng.choices(labels, k=len(labels))) for _ in range(args.bootstrap)]
    quantiles = [statistics.quantiles(values, n=40) for values in zip(*resampled)]
    return [(q[0], q[-1]) for q in quantiles]


def print_shares(names, point, ci):
    for name, share, (lo, hi) in zip(names, point, ci):
        print(f"  {name:<20} {share:6.1%}   95% interval {lo:6.1%} - {hi:6.1%}")


def rounded(keys, point, ci):
    """The summary's shares and their intervals, to 4 places."""
    shares = {k: round(share, 4) for k, share in zip(keys, point)}
    shares["ci95"] = {k: [round(lo, 4), round(hi, 4)] for k, (lo, hi) in zip(keys, ci)}
    return shares


def text_bar(point):
    """Figure 1's bar in 60 characters: # A better, = tie, - B better."""
    a_end, tie_end, b_end = (round(60 * share) for share in accumulate(point[:3]))
    return "#" * a_end + "=" * (tie_end - a_end) + "-" * (b_end - tie_end)


def label_counts(rows, field):
    """annotator -> Counter of the items' labels (or ratings) in field: each item once, by its last
    verdict, else by its last skip or unparsed verdict (a skipped item judged later is judged)."""
    last = {}  # (annotator, prompt, order) -> label; order as in last_verdicts
    for row in rows:
        item = (row["annotator"], row["prompt"], row["first"] if row.get("both_orders") else "")
        if row[field] in VERDICTS or last.get(item) not in VERDICTS:
            last[item] = row[field]
    counts = {}
    for (who, _, _), label in last.items():
        counts.setdefault(who, Counter())[label] += 1
    return counts


def counts_text(counts, kinds):
    """ana A 3, tie 2; bob B 1"""
    parts = []
    for who, count in counts.items():
        listed = ", ".join(f"{kind} {count[kind]}" for kind in kinds if count[kind])
        parts.append(f"{who} {listed}")
    return "; ".join(parts)


def tie_discounted(u, v):
    """LIMA §4.1's agreement on one item: 1 for the same label, 0.5 when exactly one is tie."""
    if u == v:
        return 1
    if "tie" in (u, v):
        return 0.5
    return 0


def same_rating(u, v):
    """The ratings' agreement on one item: 1 for the same rating, else 0."""
    return 1 if u == v else 0


def agreements(final, annotators, score, how):
    """Prints the agreement of every two annotators on the items both judged; returns it.
    final: (annotator, prompt) -> label."""
    rows = []
    for x in annotators:
        for y in annotators:
            if y <= x:  # each two annotators once
                continue
            both = [(label, final[y, p]) for (who, p), label in final.items()
                    if who == x and (y, p) in final]
            if not both:
                continue
            share = sum(score(u, v) for u, v in both) / len(both)
            print(f"  agreement {x} - {y}: {share:.1%} on {len(both)} shared items ({how})")
            rows.append({"annotators": [x, y], "items": len(both), "agreement": round(share, 4)})
    return rows


def last_verdicts(pair):
    """(annotator, prompt, order) -> the judgment that counts: the last one that is a verdict (A, B
    or tie). The order is the file shown first for --both_orders' judgments, else ""."""
    last = {}
    for j in pair:
        if j["label"] in ("A", "B", "tie"):
            order = j["first"] if j.get("both_orders") else ""
            last[j["annotator"], j["prompt"], order] = j
    return last


def combine_orders(last):
    """(annotator, prompt) -> A, B or tie, and for each item judged in both orders whether the two
    verdicts agreed. MT-Bench's rule: the verdict stands when they agree, else it is a tie."""
    final = {}
    agreed = []
    for (who, prompt, order), j in last.items():
        if not order:
            final[who, prompt] = j["label"]
            continue
        swapped = last.get((who, prompt, SWAP[order]))
        if swapped is None or (who, prompt) in final:  # one order only, or counted already
            continue
        agree = j["label"] == swapped["label"]
        final[who, prompt] = j["label"] if agree else "tie"
        agreed.append(agree)
    return final, agreed


def report_pair(a, b, pair, rng):
    """Prints one pair of files' part of the report; returns its summary (None: no verdicts)."""
    last = last_verdicts(pair)
    final, agreed = combine_orders(last)
    labels = list(final.values())
    n = len(labels)
    print(f"\n{a} (A) vs {b} (B): {n} judgments")
    if not n:
        return None
    point = pair_shares(labels)
    ci = intervals(labels, pair_shares, rng)
    print(f"  {text_bar(point)}  "
          f"A better {point[0]:.0%} | tie {point[1]:.0%} | B better {point[2]:.0%}")
    print_shares(STATS.values(), point, ci)
    counts = label_counts(pair, "label")
    print(f"  annotators: {counts_text(counts, LABELS)}")
    agreement = agreements(final, counts, tie_discounted, "tie-discounted")
    decided = [j for j in last.values() if j["label"] != "tie"]
    first_won = sum(j["label"] == j["first"] for j in decided)
    bias = None
    if decided:  # an annotator without position bias prefers the first-shown answer half the time
        share = first_won / len(decided)
        print(f"  position bias: the answer shown first won {first_won} of {len(decided)} "
              f"({share:.1%})")
        bias = round(share, 4)
    summary = {"a": a, "b": b, "n": n,
               **rounded(STATS, point, ci),
               "annotators": counts,  # Counters: JSON objects
               "agreement": agreement,
               "first_won": first_won,
               "decided": len(decided),
               "position_bias": bias}
    if agreed:  # MT-Bench reports how often a judge contradicts itself when the answers swap
        share = sum(agreed) / len(agreed)
        print(f"  both orders: the two verdicts agreed on {sum(agreed)} of {len(agreed)} items "
              f"({share:.1%}); the others count as ties")
        summary["both_orders"] = {"items": len(agreed), "agreed": sum(agreed),
                                  "agreement": round(share, 4)}
    one_order = 0  # both orders, but a verdict in only one of them so far
    for who, prompt, order in last:
        if order and (who, prompt, SWAP[order]) not in last:
            one_order += 1
    if one_order:
        print(f"  both orders: {one_order} items judged in one order only, left out")
    return summary


def report_ratings(path, rated, rng):
    """Prints one answer file's ratings; returns their summary (None: no ratings)."""
    final = {}  # an annotator's last rating of an answer is the one that counts
    for r in rated:
        if r["rating"] in RATINGS[:3]:
            final[r["annotator"], r["prompt"]] = r["rating"]
    labels = list(final.values())
    print(f"\n{path}: {len(labels)} ratings")
    if not labels:
        return None
    point = rating_shares(labels)
    ci = intervals(labels, rating_shares, rng)
    print(f"  Fail {point[0]:.0%} | Pass {point[1]:.0%} | Excellent {point[2]:.0%}")
    print_shares(RATING_STATS.values(), point, ci)
    counts = label_counts(rated, "rating")
    print(f"  annotators: {counts_text(counts, RATINGS)}")
    by_annotator = {}
    for who in counts:
        own = [rating for (w, _), rating in final.items() if w == who]
        if not own:
            continue
        shares = rating_shares(own)
        by_annotator[who] = {"n": len(own)}
        for key, share in zip(RATING_STATS, shares):
            by_annotator[who][key] = round(share, 4)
        print(f"  {who}: Fail {shares[0]:.0%} | Pass {shares[1]:.0%} | "
              f"Excellent {shares[2]:.0%} of {len(own)}")
    agreement = agreements(final, counts, same_rating, "the same rating")
    return {"answers": path, "n": len(labels),
            **rounded(RATING_STATS, point, ci),
            "annotators": counts,
            "by_annotator": by_annotator,
            "agreement": agreement}


def holds_ratings(path):
    """Whether a file holds ratings, not judgments: its first line says (read_jsonl, not this,
    names what is wrong in a file)."""
    try:
        with open(path, encoding="utf-8") as f:
            first = json.loads(f.readline())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(first, dict) and "rating" in first


def pyplot():
    """matplotlib's pyplot, drawing to files; without matplotlib, a line saying what to install."""
    try:
        import matplotlib
    except ImportError:
        sys.exit("error: --plot needs matplotlib: pip install matplotlib")
    matplotlib.use("Agg")  # to a file: no window, no display needed
    import matplotlib.pyplot as plt
    return plt


def plot_pairs(plt, summaries):
    """Figure 1: one stacked horizontal bar per pair of files, A better / tie / B better."""
    from matplotlib.ticker import PercentFormatter

    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.6 * len(summaries)), dpi=100)
    rows = range(len(summaries))
    left = [0.0] * len(summaries)
    for key, label in (("a_better", "A"), ("tie", "tie"), ("b_better", "B")):
        widths = [s[key] for s in summaries]
        name = STATS[key]
        bars = ax.barh(rows, widths, 0.6, left=left, color=COLORS[label], label=name)
        counts = [round(s[key] * s["n"]) for s in summaries]  # shares are count / n to 4 places
        texts = [f"{c} ({w:.0%})" if w >= 0.08 else "" for c, w in zip(counts, widths)]
        ax.bar_label(bars, texts, label_type="center")
        left = [x + w for x, w in zip(left, widths)]
    ax.set_yticks(rows, [f"A: {s['a']}\nB: {s['b']}" for s in summaries])
    ax.invert_yaxis()  # the first pair on top
    ax.set_xlim(0, 1)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.legend(ncols=3, loc="lower center", bbox_to_anchor=(0.5, 1), frameon=False)
    fig.tight_layout()
    return fig


def plot_ratings(plt, summaries):
    """Figure 3: the shares of Fail, Pass and Excellent; three bars for each answer file."""
    from matplotlib.ticker import PercentFormatter

    fig, ax = plt.subplots(figsize=(3 + 2 * len(summaries), 4), dpi=100)
    names = list(RATING_STATS.values())
    for i, s in enumerate(summaries):
        heights = [s[key] for key in RATING_STATS]
        places = [4 * i + k for k in range(3)]  # each file's three bars, a gap before the next
        legend = names if i == 0 else None
        colors = [COLORS[name] for name in names]
        bars = ax.bar(places, heights, 0.9, color=colors, label=legend)
        counts = [round(h * s["n"]) for h in heights]  # shares are count / n to 4 places
        ax.bar_label(bars, [f"{h:.0%} ({c})" for h, c in zip(heights, counts)])
    if len(summaries) == 1:  # as the paper draws it
        ax.set_xticks(range(3), names)
    else:
        ax.set_xticks([4 * i + 1 for i in range(len(summaries))], [s["answers"] for s in summaries])
        ax.legend(ncols=3, loc="upper left", frameon=False)
    ax.set_ylim(0, 1)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    rated = ", ".join(f"{s['answers']}: {s['n']}" for s in summaries)
    ax.set_title(f"ratings ({rated})")
    fig.tight_layout()
    return fig


if args.report:
    plt = None
    if args.plot:  # said now, not after the report
        if not Path(args.plot).parent.is_dir():
            sys.exit(f"error: --plot {args.plot}: no directory {Path(args.plot).parent}")
        plt = pyplot()
    rated = holds_ratings(args.report)
    if rated:
        rows = read_jsonl(args.report, is_rating, RATING)
    else:
        rows = read_jsonl(args.report, is_judgment, JUDGMENT)
    rows = [row for row in rows if args.annotator in (None, row["annotator"])]
    if not rows:
        by = f" by {args.annotator}" if args.annotator else ""
        sys.exit(f"error: {args.report}: no {'ratings' if rated else 'judgments'}{by}")
    rng = random.Random(args.seed or 0)
    groups = {}  # each answer file's ratings, or each pair of files' judgments, in order
    for row in rows:
        key = row["answers"] if rated else (row["a"], row["b"])
        groups.setdefault(key, []).append(row)
    summaries = []
    for key, group in groups.items():
        if rated:
            summary = report_ratings(key, group, rng)
        else:
            summary = report_pair(*key, group, rng)
        if summary:
            summaries.append(summary)
    lines = [json.dumps(summary, ensure_ascii=False) for summary in summaries]
    print("\n".join(lines))  # for scripts: one line per pair or answer file
    if plt and not summaries:
        sys.exit(f"error: --plot {args.plot}: nothing to draw, no verdicts")
    if plt:
        fig = plot_ratings(plt, summaries) if rated else plot_pairs(plt, summaries)
        try:
            fig.savefig(args.plot)
        except (OSError, ValueError) as e:  # ValueError: a format matplotlib does not write
            sys.exit(f"error: --plot {args.plot}: cannot write it ({e})")
        figure = f"Figure 1, {len(summaries)} pairs of files"
        if rated:
            figure = f"Figure 3, {len(summaries)} answer files"
        print(f"wrote {args.plot}: {figure}", file=sys.stderr)
    sys.exit(0)

# -----------------------------------------------------------------------------
# Judge a pair's answers or rate one file's: the items, and what was done before


def claim_out(path):
    """--out opened for appending, unbuffered (a failed write is undone whole), and locked while
    this run lives: one writer a file. A last line without its newline (a write cut short) is
    dropped: each line ends where one write did."""
    try:
        f = open(path, "ab", buffering=0)
    except OSError as e:
        sys.exit(f"error: --out {path}: cannot write to it ({e.strerror})")
    try:
        if fcntl:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.exit(f"error: --out {path}: another compare.py is writing there; wait for it or give "
                 "another --out")
    text = path.read_bytes()
    if text and not text.endswith(b"\n"):
        whole = text.rfind(b"\n") + 1
        print(f"{path}: dropping a cut-short last line ({len(text) - whole} bytes)",
              file=sys.stderr)
        f.truncate(whole)
    return f


if judging:
    A, B = args.answers
    answers = {"A": read_answers(A), "B": read_answers(B)}
    prompts = [p for p in answers["A"] if p in answers["B"]]  # the items: both files answer them
    if not prompts:
        sys.exit(f"error: {A} and {B} answer no prompt in common")
    for path, responses in zip(args.answers, answers.values()):
        if len(responses) > len(prompts):
            print(f"{path}: {len(responses) - len(prompts)} prompts not in the other file, skipped",
                  file=sys.stderr)
else:
    answers = read_answers(args.rate)
    answered = list(answers)
    if args.sample > len(answered):
        sys.exit(f"error: --sample {args.sample}: {args.rate} answers {len(answered)} prompts")
    drawn = range(len(answered))
    if args.sample:  # LIMA §4.3 rated 50 answers drawn at random; kept in the file's order
        sampler = random.Random(args.seed or 0)  # the same draw on every rerun
        drawn = sorted(sampler.sample(drawn, args.sample))
    prompts = [answered[i] for i in drawn]  # the items
out = Path(args.out)
if not out.parent.is_dir():
    sys.exit(f"error: --out {out}: no directory {out.parent}")
out_file = claim_out(out)  # before reading it: what was done before cannot change under this run
annotator = args.annotator or args.judge_model or getpass.getuser()
field = "rating" if rating else "label"
if rating:
    past = read_jsonl(out, is_rating, RATING)
    past = [r for r in past if (r["answers"], r["annotator"]) == (args.rate, annotator)]
else:
    past = read_jsonl(out, is_judgment, JUDGMENT)
    past = [j for j in past if (j["a"], j["b"], j["annotator"]) == (A, B, annotator)]
    if any(j.get("both_orders", False) != args.both_orders for j in past):
        protocol = "in one order" if args.both_orders else "in both orders"
        sys.exit(f"error: --out {out}: {annotator} judged {A} vs {B} {protocol} before: keep to "
                 "that, or give another --annotator")


def slot_of(row):
    """The item a judgment or rating is of: its prompt; with --both_orders, prompt and order."""
    if args.both_orders:
        return row["prompt"], row["first"]
    return row["prompt"]


unparsed = Counter(slot_of(row) for row in past if row[field] == "unparsed")
judged = {slot_of(row): row[field] for row in past if row[field] in VERDICTS}  # skips: asked again
rng = random.Random(args.seed)
slots = prompts
if args.both_orders:  # each item twice, the answers swapped; the second time after all the others
    firsts = [rng.choice("AB") for _ in prompts]
    for i, prompt in enumerate(prompts):  # judged in one order before: the other is the second time
        for first in "AB":
            if (prompt, first) in judged or unparsed[prompt, first] >= TRIES:
                firsts[i] = first
    swapped = [(prompt, SWAP[first]) for prompt, first in zip(prompts, firsts)]
    slots = list(zip(prompts, firsts)) + swapped
judged = {s: judged[s] for s in slots if s in judged}  # not those of prompts no longer drawn
todo = [s for s in slots if s not in judged and unparsed[s] < TRIES]  # resume: only what is left
done = "rated" if rating else "judged"
orders = " in both orders" if args.both_orders else ""
print(f"{annotator}: {len(prompts)} prompts{orders}, {len(slots) - len(todo)} {done} before, "
      f"{len(todo)} to go")

# -----------------------------------------------------------------------------
# Ask: the judge model, or the person at the terminal

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
# LIMA §4.3's absolute analysis: its three labels, Excellent being as good as an expert's answer
RATE_INSTRUCTION = ("Below is a question and an AI assistant's answer to it. Rate the answer with "
                    "one of three labels:\n"
                    "Fail: the answer does not meet the requirements of the question.\n"
                    "Pass: the answer meets the requirements of the question.\n"
                    "Excellent: the answer meets the requirements and is as good as or better "
                    "than what an expert would write.\n\n"
                    "[Question]\n{}\n\n"
                    "[Answer]\n{}\n\n"
                    "[End]\n"
                    "Explain your rating briefly, then end with one line that is exactly one of:\n"
                    "Rating: Fail\n"
                    "Rating: Pass\n"
                    "Rating: Excellent")
VERDICT = r"verdict:\s*(1|2|neither)\.?"  # the judge's last line, matched whole: never a guess
RATE_VERDICT = r"rating:\s*(fail|pass|excellent)\.?"
KEYS = "better: 1 or 2; t: neither is significantly better; s: skip; q: quit > "
RATE_KEYS = "f: Fail; p: Pass; e: Excellent; s: skip; q: quit > "
RATE_GUIDE = ("Rate each answer (LIMA §4.3). Fail: it does not meet the requirements of the "
              "prompt. Pass: it meets them. Excellent: it meets them and is as good as or better "
              "than what an expert would write.")
RATE_LABELS = {"f": "Fail", "p": "Pass", "e": "Excellent", "s": "skip", None: "unparsed",
               "fail": "Fail", "pass": "Pass", "excellent": "Excellent"}  # keys, then verdicts


def post(request, outcome):
    """Sends request; appends to outcome the reply's body (None: over MAX_REPLY bytes) or what went
    wrong. Runs in a thread, so that however slowly the server sends, ask_judge waits --timeout."""
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as response:
            body = response.read(MAX_REPLY + 1)  # never more, however much the server sends
        outcome.append(body if len(body) <= MAX_REPLY else None)
    except Exception as e:  # raised again by ask_judge, in the main thread
        outcome.append(e)


def reply_content(body):
    """The message content of a chat completion's body; None where there is no string there."""
    try:
        completion = json.loads(body)  # ValueError: not JSON at all, a server that is no judge
        content = completion["choices"][0]["message"]["content"]
    except (RecursionError, LookupError, TypeError):  # nested too deep, keys missing, not a dict
        return None
    return content if isinstance(content, str) else None


def ask_judge(content):
    """The judge's reply to one item ("" where it holds no text: an unparseable verdict); a network
    or server failure, or no reply within --timeout, ends the run (a rerun resumes)."""
    message = {"role": "user", "content": content}
    body = {"model": args.judge_model, "messages": [message]}
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, json.dumps(body).encode(), headers)
    outcome = []
    thread = threading.Thread(target=post, args=(request, outcome), daemon=True)
    thread.start()
    thread.join(args.timeout)  # a thread still waiting on the server ends with the run
    try:
        if not outcome:
            raise TimeoutError
        if isinstance(outcome[0], Exception):
            raise outcome[0]
        body = outcome[0]
        reply = None if body is None else reply_content(body)
        if reply is None:
            what = f"over {MAX_REPLY >> 20} MB" if body is None else "without a string as content"
            print(f"warning: judge {url}: a reply {what}, taken as an unparseable verdict",
                  file=sys.stderr)
        return reply or ""
    except urllib.error.HTTPError as e:
        why = f"HTTP {e.code} {e.reason}"
    except (OSError, http.client.HTTPException) as e:  # urllib.error.URLError is an OSError
        reason = getattr(e, "reason", e)
        why = str(reason)
        if isinstance(reason, TimeoutError):
            why = f"no reply within --timeout {args.timeout:g} s"
    except ValueError:
        why = "the reply is not an OpenAI chat completion"
    sys.exit(f"error: judge {url}: {why}; {len(judged)} of {len(slots)} {done}, rerun to continue")


def parse_verdict(reply, pattern):
    """The verdict on the reply's last line, lowercased ("1", "neither", "pass"); None for all
    else. A line ends at a newline only, as in the instruction: U+2028 starts no verdict line."""
    lines = reply.strip().split("\n")
    last = lines[-1].strip(" *`")  # markdown around it is allowed
    verdict = re.fullmatch(pattern, last, re.I)
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


def ask_person(screen, menu, keys):
    """The key a person pressed for one item; q and the end of input stop the run."""
    print(screen)
    key = None
    while key not in (*keys, "q"):
        print(menu, end="", flush=True)
        key = read_key()
    if key == "q":
        raise KeyboardInterrupt  # stops as Ctrl-C does
    return key


def pair_item(slot, progress):
    """One pair's item: its record, the judge's message, the person's screen, and how a key or
    verdict maps back to the files."""
    if args.both_orders:
        prompt, first = slot
    else:  # LIMA §4.1: the two answers in random order, drawn anew for every item
        prompt, first = slot, rng.choice("AB")
    second = SWAP[first]
    shown = [answers[first][prompt], answers[second][prompt]]
    record = {"a": A, "b": B, "annotator": annotator, "prompt": prompt, "first": first}
    if args.both_orders:
        record["both_orders"] = True
    screen = (f"\n{'=' * 30} {progress} {'=' * 30}\n{prompt}\n"
              f"{'-' * 14} 1 {'-' * 14}\n{shown[0]}\n"
              f"{'-' * 14} 2 {'-' * 14}\n{shown[1]}\n")
    labels = {"1": first, "2": second, "t": "tie", "neither": "tie", "s": "skip",
              None: "unparsed"}
    return record, INSTRUCTION.format(prompt, *shown), screen, labels


def rating_item(prompt, progress):
    """One answer's item to rate, blind to the model's name (pair_item's four parts)."""
    answer = answers[prompt]
    record = {"answers": args.rate, "annotator": annotator, "prompt": prompt}
    screen = (f"\n{'=' * 30} {progress} {'=' * 30}\n{prompt}\n"
              f"{'-' * 14} answer {'-' * 14}\n{answer}\n")
    return record, RATE_INSTRUCTION.format(prompt, answer), screen, RATE_LABELS


def append(f, row):
    """One line to f (--out) in one write: a failed write (a full disk) is undone, so that every
    line there is whole and a rerun continues from them."""
    # a lone surrogate (an answers file may escape one) goes back out as the escape it came in as
    data = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8", "backslashreplace")
    size = f.seek(0, os.SEEK_END)
    try:
        written = 0
        while written < len(data):  # an unbuffered write may take part of it
            written += f.write(data[written:])
    except OSError as e:
        f.truncate(size)
        sys.exit(f"error: --out {out}: cannot write to it ({e.strerror}); rerun to continue")


def annotate(f, item, progress, tries):
    """Asks the judge (up to tries times, until its verdict parses) or the person about one item;
    every answer is written to f at once. The label; None when no verdict of the judge parsed."""
    record, content, screen, labels = item
    for _ in range(tries):
        if args.judge:
            reply = ask_judge(content)
            key = parse_verdict(reply, RATE_VERDICT if rating else VERDICT)
            extra = {"judge": args.judge_model, "reply": reply}
        elif rating:
            key = ask_person(screen, RATE_KEYS, ("f", "p", "e", "s"))
            extra = {}
        else:
            key = ask_person(screen, KEYS, ("1", "2", "t", "s"))
            extra = {}
        label = labels[key]
        append(f, {**record, field: label, **extra})  # at once: an interrupted run loses nothing
        if args.judge:
            print(f"{progress} {'unparseable verdict' if key is None else done}")
        if key is not None:  # a person's key is never None
            return label
    return None


if args.judge:
    url = args.judge.rstrip("/")
    if not url.endswith("/chat/completions"):  # http://host:port or .../v1
        url += "/chat/completions" if url.endswith("/v1") else "/v1/chat/completions"
    api_key = os.environ.get("OPENAI_API_KEY")
if rating and not args.judge and todo:
    print(RATE_GUIDE)
try:
    for i, slot in enumerate(todo):
        progress = f"[{len(slots) - len(todo) + i + 1}/{len(slots)}]"
        if rating:
            item = rating_item(slot, progress)
        else:
            item = pair_item(slot, progress)
        label = annotate(out_file, item, progress, TRIES - unparsed[slot])
        if label is not None:
            judged[slot] = label
except KeyboardInterrupt:  # q, Ctrl-C or the end of input: everything judged is already in --out
    print("\nstopped; rerun the same command to continue", file=sys.stderr)

# only now the annotator learns which file was which
summary = f"Summary: python compare.py --report {out}"
count = Counter(judged.values())
n_judged = len(judged) - count["skip"]  # this run's skips are asked again on a rerun
if rating:
    print(f"\n{annotator}, {n_judged} of {len(slots)} rated: Fail {count['Fail']}, "
          f"Pass {count['Pass']}, Excellent {count['Excellent']}, skipped {count['skip']}. "
          f"{summary}")
elif args.both_orders:
    verdicts = []  # the items judged in both orders, combined by MT-Bench's rule
    for prompt in prompts:
        both = [judged.get((prompt, "A")), judged.get((prompt, "B"))]
        if set(both) <= {"A", "B", "tie"}:
            verdicts.append(both[0] if both[0] == both[1] else "tie")
    count = Counter(verdicts)
    print(f"\n{annotator}, {len(verdicts)} of {len(prompts)} judged in both orders: {A} better "
          f"{count['A']}, tie {count['tie']}, {B} better {count['B']}. {summary}")
else:
    print(f"\n{annotator}, {n_judged} of {len(prompts)} judged: {A} better {count['A']}, "
          f"tie {count['tie']}, {B} better {count['B']}, skipped {count['skip']}. {summary}")
