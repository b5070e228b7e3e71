"""KL divergence against a base model (baq.eval.divergence, baq.eval.scoring.score) vs slow
references."""

from __future__ import annotations

import json
import math

import pytest
import torch

from baq.cli import main
from baq.eval import divergence, scoring
from helpers import corpus, make_tiny_llama


def slow_stats(base_logits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor):
    """KL(p || q), top-1 agreement, dp and dnll one position at a time, in float64."""
    kl, agree, dp, dnll = [], [], [], []
    for t in range(len(targets)):
        p = torch.softmax(base_logits[t].double(), -1)
        q = torch.softmax(logits[t].double(), -1)
        kl.append(sum(float(p[i] * math.log(p[i] / q[i])) for i in range(len(p))))
        agree.append(int(p.argmax()) == int(q.argmax()))
        y = int(targets[t])
        dp.append(float(q[y] - p[y]))
        dnll.append(math.log(p[y]) - math.log(q[y]))
    d = torch.float64
    return (
        torch.tensor(kl, dtype=d),
        torch.tensor(agree),
        torch.tensor(dp, dtype=d),
        torch.tensor(dnll, dtype=d),
    )


def random_pair(positions=300, vocab=40, noise=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = 3 * torch.randn(positions, vocab, generator=g)
    other = base + noise * torch.randn(positions, vocab, generator=g)
    targets = torch.randint(0, vocab, (positions,), generator=g)
    return base, other, targets


def test_exact_window_matches_slow_reference():
    base, other, targets = random_pair()  # 300 positions: more than one CHUNK
    got = divergence.exact_window(base, other, targets)
    want = slow_stats(base, other, targets)
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-4, atol=1e-6)
    assert torch.equal(got[1], want[1])
    for g, w in zip(got[2:], want[2:]):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-6)


def test_compact_kl_is_exact_at_full_vocab_and_a_lower_bound_below():
    base, other, targets = random_pair(vocab=30, noise=1.0)
    exact = divergence.exact_window(base, other, targets)[0]
    full = divergence.compact_kl(divergence.compact_window(base, targets, 30), other, targets)
    torch.testing.assert_close(full[0], exact, rtol=1e-4, atol=1e-5)
    for k in (1, 4, 10):
        bw = divergence.compact_window(base, targets, k)
        kl = divergence.compact_kl(bw, other, targets)[0]
        assert (kl <= exact + 1e-5).all()  # merging outcomes never adds divergence
        # slow merged-bin KL: top-k tokens of p, the rest as one outcome on both sides
        p, q = torch.softmax(base.double(), -1), torch.softmax(other.double(), -1)
        top = p.topk(k, -1).indices
        pk, qk = p.gather(1, top), q.gather(1, top)
        r, s = 1 - pk.sum(-1), 1 - qk.sum(-1)
        want = (pk * (pk / qk).log()).sum(-1) + r * (r / s).log()
        torch.testing.assert_close(kl.double(), want, rtol=1e-3, atol=1e-5)
        assert torch.equal(divergence.compact_kl(bw, other, targets)[1], exact_top(base, other))


def exact_top(base, other):
    return base.argmax(-1) == other.argmax(-1)


def test_summary_matches_numpy_definitions():
    base, other, targets = random_pair(positions=500)
    stats = divergence.PositionStats()
    stats.add(*divergence.exact_window(base[:200], other[:200], targets[:200]))
    stats.add(*divergence.exact_window(base[200:], other[200:], targets[200:]))
    s = stats.summary()
    kl, agree, dp, dnll = slow_stats(base, other, targets)
    n = len(kl)
    assert s["kl_positions"] == n
    assert s["kl_mean"] == pytest.approx(float(kl.mean()), rel=1e-4)
    assert s["kl_mean_stderr"] == pytest.approx(float(kl.std() / math.sqrt(n)), rel=1e-3)
    assert s["kl_median"] == pytest.approx(float(kl.median()), rel=1e-2)
    assert s["kl_max"] == pytest.approx(float(kl.max()), rel=1e-4)
    assert s["kl_p99"] <= s["kl_p999"] <= s["kl_max"]
    a = float(agree.double().mean())
    assert s["kl_top_token_agreement"] == pytest.approx(a)
    assert s["kl_top_token_agreement_stderr"] == pytest.approx(math.sqrt(a * (1 - a) / n))
    assert s["kl_rms_dp"] == pytest.approx(float(dp.square().mean().sqrt()), rel=1e-4)
    assert s["kl_mean_ln_ppl_ratio"] == pytest.approx(float(dnll.mean()), rel=1e-4, abs=1e-7)


def windows(n=3, seq=48, vocab=512):
    return torch.randint(3, vocab, (n, seq), generator=torch.Generator().manual_seed(1))


def test_a_model_against_itself_has_zero_kl_and_full_agreement():
    model = make_tiny_llama()
    w = windows()
    s = scoring.score(model, w, base_model=model, record_topk=8)
    assert s.divergence["kl_mean"] == 0.0 and s.divergence["kl_max"] == 0.0
    assert s.divergence["kl_top_token_agreement"] == 1.0 and s.divergence["kl_rms_dp"] == 0.0
    assert s.divergence["kl_mean_compact"] == 0.0
    again = scoring.score(model, w, base_record=s.base_record)
    assert again.divergence["kl_mean"] == 0.0 and again.perplexity == s.perplexity


def test_score_against_a_perturbed_model_equals_per_window_reference(tmp_path):
    base, model = make_tiny_llama(), make_tiny_llama()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    w = windows()
    s = scoring.score(model, w, base_model=base, record_topk=16)
    assert s.perplexity == pytest.approx(scoring.perplexity(model, w), rel=1e-6)
    with torch.no_grad():
        parts = [
            slow_stats(
                base(input_ids=x[None]).logits[0, :-1],
                model(input_ids=x[None]).logits[0, :-1],
                x[1:],
            )
            for x in w
        ]
    kl = torch.cat([p[0] for p in parts])
    assert s.divergence["kl_mean"] == pytest.approx(float(kl.mean()), rel=1e-3)
    assert 0 < s.divergence["kl_mean_compact"] <= s.divergence["kl_mean"] + 1e-7
    # the record survives the file and gives the compact KL again
    path = tmp_path / "base.safetensors"
    s.base_record.save(path)
    back = divergence.BaseRecord.load(path)
    again = scoring.score(model, w, base_record=back)
    assert again.divergence["kl_mean"] == pytest.approx(s.divergence["kl_mean_compact"], rel=1e-6)
    with pytest.raises(ValueError, match="other token windows"):
        scoring.score(model, w[:, :40], base_record=back)


def test_eval_cli_base_and_base_logits(tiny_model_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(corpus(60_000))
    ev = ["--eval", str(text), "--eval-windows", "2", "--eval-seqlen", "64"]
    logits, rep = tmp_path / "b" / "base.safetensors", tmp_path / "r.json"
    # the model against itself, exact, writing its record
    argv = ["eval", str(tiny_model_dir), *ev, "--base", str(tiny_model_dir)]
    assert main([*argv, "--base-logits", str(logits), "--report", str(rep), "-q"]) == 0
    out = capsys.readouterr().out
    assert "KL divergence 0.00000" in out and "same top token 100.00" in out
    got = json.loads(rep.read_text())["sets"][str(text)]
    assert got["kl_mean"] == 0 and got["kl_top_token_agreement"] == 1 and got["perplexity"] > 1
    assert main(["eval", str(tiny_model_dir), *ev, "--base-logits", str(logits), "-q"]) == 0
    assert "KL divergence 0.00000" in capsys.readouterr().out
    # other windows, a missing file, a bad combination: one line, exit 2
    bad = [
        (["--eval-windows", "1"], "other token windows"),
        (["--base-logits", str(tmp_path / "none.st")], "no such file"),
        (["--save-base-logits"], "add it"),
    ]
    for extra, message in bad:
        args = ["eval", str(tiny_model_dir), *ev, *extra]
        if "--base-logits" not in extra and extra != ["--save-base-logits"]:
            args += ["--base-logits", str(logits)]
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err
