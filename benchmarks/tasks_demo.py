"""A small local multiple-choice task for ``baq eval --tasks``, built from a text file.

    python benchmarks/tasks_demo.py OUT_DIR [--text ../shared/data/wikitext2-test.txt]
                                    [--items 20] [--skip-chars 400000] [--seed 0]
    baq eval [MODEL or saved folder] --tasks wiki_ending --tasks-dir OUT_DIR --report r.json

Each item is one sentence of the text cut after 60% of its words: the prompt is the beginning,
the right choice its own ending, the three others the endings of three other sentences (a
HellaSwag-like sentence-completion task, scored by lm-eval's log-likelihood ``acc``). Sentences
of 14 to 40 words are taken after the first ``--skip-chars`` characters (past the 32 x 2048
tokens the standard protocol evaluates perplexity on), and drawn with ``random.Random(seed)``.
The task reads its items from the jsonl file written beside its YAML, so it runs offline.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAME = "wiki_ending"
CHOICES = 4


def sentences(text: str, lo: int = 14, hi: int = 40) -> list[list[str]]:
    """WikiText's `` . ``-separated sentences of ``lo`` to ``hi`` words, headings dropped."""
    out = []
    for line in text.splitlines():
        if not line.strip() or line.strip().startswith("="):
            continue
        for sent in line.split(" . "):
            words = sent.split()
            if lo <= len(words) <= hi:
                out.append(words)
    return out


def make_items(sents: list[list[str]], n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    picked = rng.sample(range(len(sents)), n * CHOICES)
    items = []
    for k in range(n):
        group = [sents[i] for i in picked[k * CHOICES : (k + 1) * CHOICES]]
        cuts = [max(1, int(0.6 * len(w))) for w in group]
        endings = [" ".join(w[c:]) + " ." for w, c in zip(group, cuts)]
        order = list(range(CHOICES))
        rng.shuffle(order)
        items.append(
            {
                "context": " ".join(group[0][: cuts[0]]),
                "choices": [endings[i] for i in order],
                "answer": order.index(0),
            }
        )
    return items


def write_task(out: Path, items: list[dict]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    data = (out / f"{NAME}.jsonl").absolute()
    data.write_text("".join(json.dumps(it) + "\n" for it in items))
    (out / f"{NAME}.yaml").write_text(
        f"task: {NAME}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files: {{test: {data}}}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: answer\n"
        "metric_list:\n"
        "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n"
    )
    return out / f"{NAME}.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--text", type=Path, default=Path("../shared/data/wikitext2-test.txt"))
    ap.add_argument("--items", type=int, default=20)
    ap.add_argument("--skip-chars", type=int, default=400_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    text = args.text.read_text(encoding="utf-8")[args.skip_chars :]
    items = make_items(sentences(text), args.items, args.seed)
    print(write_task(args.out, items))


if __name__ == "__main__":
    main()
