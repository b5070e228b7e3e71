"""Downstream tasks through lm-evaluation-harness: a local multiple-choice task, offline."""

import copy
import json
import random
import sys

import pytest
import torch

from baq.cli import main
from baq.config import QuantConfig
from baq.run.quantization import quantize_model
from baq.saved import storage
from helpers import VOCAB, make_tiny_llama, make_tokenizer

pytest.importorskip("lm_eval")

from baq.integrations import lm_eval_harness

N_ITEMS, N_CHOICES = 12, 4


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def write_task(folder, items, name="tiny_mc"):
    """A multiple-choice task YAML reading ``items`` from a jsonl file beside it."""
    folder.mkdir(exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(it) + "\n" for it in items))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files: {{test: {data}}}\n"
        f"  cache_dir: {folder / 'cache'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: answer\n"
        "metric_list:\n"
        "  - metric: acc\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
    )
    return folder


def make_items(seed=0):
    """Questions and choices from words the tiny tokenizer knows (no <unk>)."""
    words = sorted(w for w in make_tokenizer().get_vocab() if not w.startswith("<"))
    rng = random.Random(seed)
    return [
        {
            "question": " ".join(rng.choices(words, k=6)),
            "choices": [" ".join(rng.choices(words, k=3)) for _ in range(N_CHOICES)],
            "answer": i % N_CHOICES,
        }
        for i in range(N_ITEMS)
    ]


def reference_predictions(model, tok, items):
    """The choice whose tokens after the question have the largest summed log-probability,
    from a plain forward of the model (lm-eval's rule, computed without it)."""
    preds = []
    for it in items:
        ctx = tok(it["question"], add_special_tokens=False)["input_ids"]
        scores = []
        for choice in it["choices"]:
            cont = tok(" " + choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            targets = ids[0, len(ctx) :]
            scores.append(logp[len(ctx) - 1 :].gather(1, targets[:, None]).sum().item())
        preds.append(max(range(len(scores)), key=scores.__getitem__))
    return preds


def accuracy(preds, items):
    return sum(p == it["answer"] for p, it in zip(preds, items)) / len(items)


def test_saved_folder_scores_as_the_in_memory_model_and_float_differs_where_predictions_do(
    tmp_path, offline
):
    items = make_items()
    tok = make_tokenizer()
    model = make_tiny_llama()
    float_model = copy.deepcopy(model)
    # answers: the float model's own choice on two items of every three, another on the third,
    # so its accuracy is 2/3 by construction
    for i, (it, pred) in enumerate(zip(items, reference_predictions(float_model, tok, items))):
        it["answer"] = pred if i % 3 != 2 else (pred + 1) % N_CHOICES
    task_dir = write_task(tmp_path / "tasks", items)
    cfg = QuantConfig(method="rtn", bits=2, clip=False)
    calib = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    run = quantize_model(model, calib, cfg, device="cpu", progress=False)
    saved = storage.save_quantized(tmp_path / "q", model, tok, run.results, cfg)

    fp = lm_eval_harness.run_tasks(float_model, tok, ["tiny_mc"], task_dir)["results"]["tiny_mc"]
    q = lm_eval_harness.run_tasks(model, tok, ["tiny_mc"], task_dir)["results"]["tiny_mc"]
    report = tmp_path / "report.json"
    argv = ["eval", str(saved), "--tasks", "tiny_mc", "--tasks-dir", str(task_dir)]
    assert main([*argv, "--report", str(report), "-q"]) == 0
    from_disk = json.loads(report.read_text())["tasks"]["results"]["tiny_mc"]

    # lm-eval scored the models it was given: its predictions are the plain forward's argmax
    assert fp["predictions"] == reference_predictions(float_model, tok, items)
    assert q["predictions"] == reference_predictions(model, tok, items)
    for entry in (fp, q, from_disk):
        assert entry["items"] == N_ITEMS
        assert entry["metrics"]["acc"] == pytest.approx(accuracy(entry["predictions"], items))

    assert fp["metrics"]["acc"] == pytest.approx(2 / 3)

    # the packed folder predicts every item as the in-memory quantized model
    assert from_disk["predictions"] == q["predictions"]
    assert from_disk["metrics"]["acc"] == q["metrics"]["acc"]

    # 2-bit RTN changes some predictions (seeded) and the accuracy, by those items alone
    differ = [i for i in range(N_ITEMS) if fp["predictions"][i] != q["predictions"][i]]
    assert differ
    moved = sum(
        (fp["predictions"][i] == items[i]["answer"]) - (q["predictions"][i] == items[i]["answer"])
        for i in differ
    )
    assert moved != 0
    assert fp["metrics"]["acc"] - q["metrics"]["acc"] == pytest.approx(moved / N_ITEMS)


def test_tasks_without_lm_eval_is_one_line_before_loading(
    tiny_model_dir, tmp_path, monkeypatch, no_model_load, capsys
):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    assert main(["eval", str(tiny_model_dir), "--tasks", "tiny_mc"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert 'pip install "baq[eval]"' in err


def test_tasks_alone_runs_no_perplexity_and_prints_accuracy(
    tiny_model_dir, tmp_path, offline, capsys
):
    task_dir = write_task(tmp_path / "tasks", make_items(seed=1))
    argv = ["eval", str(tiny_model_dir), "--tasks", "tiny_mc", "--tasks-dir", str(task_dir)]
    assert main([*argv, "-q"]) == 0
    out = capsys.readouterr().out
    assert "perplexity" not in out
    assert "task tiny_mc acc: " in out and f"({N_ITEMS} items)" in out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tasks-dir", "TASKS"], "name the tasks to run with --tasks"),
        (["--tasks", "tiny_mc", "--tasks-dir", "MISSING"], "not a folder"),
        (["--tasks", "no_such_task", "--tasks-dir", "TASKS"], "'no_such_task' is not in"),
        (["--tasks", ",", "--tasks-dir", "TASKS"], "no task names"),
        (["--tasks", "tiny_mc", "--tasks-dir", "TASKS", "--tasks-limit", "0"], "positive"),
        (["--tasks", "tiny_mc", "--tasks-dir", "NODATA"], "check its YAML and data files"),
    ],
    ids=[
        "dir-without-tasks",
        "missing-dir",
        "unknown-task",
        "no-names",
        "limit-0",
        "missing-data-file",
    ],
)
def test_bad_task_options_fail_in_one_line_before_loading(
    extra, message, tiny_model_dir, tmp_path, offline, no_model_load, capsys
):
    write_task(tmp_path / "tasks", make_items())
    nodata = write_task(tmp_path / "nodata", make_items())
    (nodata / "tiny_mc.jsonl").unlink()
    subs = {"MISSING": tmp_path / "missing", "TASKS": tmp_path / "tasks", "NODATA": nodata}
    extra = [str(subs.get(a, a)) for a in extra]
    assert main(["eval", str(tiny_model_dir), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_split_names_keeps_order_and_drops_repeats():
    assert lm_eval_harness.split_names(["b,a", " c ,b", ""]) == ["b", "a", "c"]
