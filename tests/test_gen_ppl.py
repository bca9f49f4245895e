"""Generative perplexity (``tools/gen_ppl.py``, ``lomdm_dist.eval.generative``) against a direct
computation: a tiny randomly initialised GPT-2 and a word-level tokenizer are saved locally (no
network), and the expected numbers come from this file's own loop of log-softmax over hand-cut
windows, with hand-written EOS truncation and hand-enumerated entropies.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers_tools import load_tool

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far", "b", "c", "d", "e"]
CONTEXT = 16                       # the judge's n_positions: samples longer than this span windows
N_EMBD, N_LAYER = 32, 2
EPS32 = 2.0 ** -24


def _load_tool():
    return load_tool("gen_ppl")


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    """A 2-layer GPT-2 (n_positions 16) and a whitespace word-level tokenizer, saved as a judge."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "<eos>"] + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="<eos>")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(vocab), n_positions=CONTEXT, n_embd=N_EMBD, n_layer=N_LAYER, n_head=2,
                        bos_token_id=vocab["<eos>"], eos_token_id=vocab["<eos>"])
    model = GPT2LMHeadModel(config).eval()
    path = tmp_path_factory.mktemp("judge")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model, vocab


def _direct_nll(model, ids: list[int]) -> tuple[float, int]:
    """Sum of -log p(token | earlier tokens of its window) over windows of CONTEXT, one window at a time."""
    total, count = 0.0, 0
    for start in range(0, len(ids), CONTEXT):
        window = ids[start:start + CONTEXT]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([window])).logits[0].double()
        log_probs = torch.log_softmax(logits, dim=-1)
        for i in range(len(window) - 1):
            total -= float(log_probs[i, window[i + 1]])
            count += 1
    return total, count


def _write(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_gen_ppl_matches_a_direct_computation_with_windows_and_eos_truncation(judge_dir, tmp_path, capsys):
    path, model, vocab = judge_dir
    long_text = " ".join(WORDS[i % len(WORDS)] for i in range(40))          # windows of 16, 16, 8
    records = [
        {"text": long_text, "tokens": [1, 1, 2, 3]},
        {"text": "a b <eos> c d e"},                                        # scored: b, <eos>
        {"text": "<eos> a b <eos> c"},                                      # leading EOS is context: a, b, <eos>
        {"text": "cat"},                                                    # one token: nothing to score
        {"text": "dog ran far " * 7 + "<eos> the end"},                     # 22 tokens kept: windows 16 + 6
    ]
    kept = [long_text.split(), ["a", "b", "<eos>"], ["<eos>", "a", "b", "<eos>"], ["cat"],
            ("dog ran far " * 7).split() + ["<eos>"]]
    samples = tmp_path / "samples.jsonl"
    _write(samples, records)
    out = tmp_path / "gen_ppl.json"
    assert _load_tool().main(["--samples", str(samples), "--judge", str(path), "--batch-size", "3",
                              "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["num_samples"] == 5 and report["context"] == CONTEXT
    direct = [_direct_nll(model, [vocab.get(w, 0) for w in words]) for words in kept]
    # Rounding: each token's NLL passes float32 sums of at most 4 * n_embd terms per layer and a
    # log-sum-exp over the vocabulary; batching with padding changes their order.
    per_token_rel = (N_LAYER * 4 * N_EMBD + len(vocab)) * EPS32
    for got, (nll, count), words in zip(report["samples"], direct, kept):
        assert got["tokens_scored"] == count == max(len(words) - 1 - (len(words) - 1) // CONTEXT, 0)
        assert abs(got["nll_sum"] - nll) <= per_token_rel * max(nll, 1.0), (got, nll)
    assert [s["eos_truncated"] for s in report["samples"]] == [False, True, True, False, True]
    assert [s["judge_tokens"] for s in report["samples"]] == [40, 6, 5, 1, 24]
    assert report["samples"][3]["gen_ppl"] is None and report["unscored_samples"] == 1
    total_nll, total_count = sum(n for n, _ in direct), sum(c for _, c in direct)
    assert report["tokens_scored"] == total_count
    assert report["gen_ppl"] == pytest.approx(math.exp(total_nll / total_count), rel=1e-4)
    per_sample = [math.exp(n / c) for n, c in direct if c]
    assert report["mean_sample_gen_ppl"] == pytest.approx(sum(per_sample) / len(per_sample), rel=1e-4)
    # Entropy by hand: tokens [1, 1, 2, 3] -> 1.5 ln 2; without tokens, of the judge's ids of the whole text.
    entropies = [1.5 * math.log(2),
                 math.log(6),                                            # a b <eos> c d e: six distinct ids
                 -(0.4 * math.log(0.4) + 3 * 0.2 * math.log(0.2)),       # <eos> a b <eos> c
                 0.0,
                 -(3 * (7 / 24) * math.log(7 / 24) + 3 * (1 / 24) * math.log(1 / 24))]  # "the end": the, [UNK]
    assert [s["entropy"] for s in report["samples"]] == pytest.approx(entropies, abs=1e-12)
    assert report["mean_entropy"] == pytest.approx(sum(entropies) / 5, abs=1e-12)
    assert [s["entropy_of"] for s in report["samples"]] == ["sample"] + ["judge"] * 4
    out = capsys.readouterr().out
    assert "gen-PPL" in out and "5 samples" in out


def test_a_window_start_is_context_only_even_when_it_is_the_first_eos(judge_dir, tmp_path):
    """Windows do not overlap, so the token starting each one is never scored: an EOS at index
    CONTEXT starts a one-token window and is counted as context, not scored."""
    path, model, vocab = judge_dir
    sixteen = " ".join(WORDS[i % len(WORDS)] for i in range(CONTEXT))
    records = [{"text": sixteen + " <eos> a b"},                          # EOS at index 16: window start
               {"text": sixteen + " cat <eos> a"}]                        # EOS at index 17: scored
    kept = [sixteen.split() + ["<eos>"], sixteen.split() + ["cat", "<eos>"]]
    samples, out = tmp_path / "samples.jsonl", tmp_path / "gen_ppl.json"
    _write(samples, records)
    assert _load_tool().main(["--samples", str(samples), "--judge", str(path), "--device", "cpu",
                              "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    got = report["samples"]
    # By hand: 17 kept tokens are windows of 16 + 1 (15 scored, 2 context); 18 are 16 + 2 (16 scored).
    assert [s["kept_tokens"] for s in got] == [17, 18]
    assert [s["context_tokens"] for s in got] == [2, 2]
    assert [s["tokens_scored"] for s in got] == [15, 16]
    assert [s["eos_scored"] for s in got] == [False, True] and report["samples_eos_unscored"] == 1
    per_token_rel = (N_LAYER * 4 * N_EMBD + len(vocab)) * EPS32
    for s, words in zip(got, kept):
        nll, count = _direct_nll(model, [vocab[w] for w in words])
        assert s["tokens_scored"] == count and abs(s["nll_sum"] - nll) <= per_token_rel * max(nll, 1.0)


def _exit_code(argv) -> int:
    with pytest.raises(SystemExit) as exc:
        _load_tool().main(argv)
    return exc.value.code


def test_clear_errors_for_files_lines_and_judges(judge_dir, tmp_path, capsys):
    path, _, _ = judge_dir
    missing = tmp_path / "missing.jsonl"
    assert _exit_code(["--samples", str(missing), "--judge", str(path)]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "a b"}) + "\n\n" + json.dumps({"tokens": [1, 2]}) + "\n")
    assert _exit_code(["--samples", str(bad), "--judge", str(path)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl line 3" in err and "'text'" in err
    good = tmp_path / "good.jsonl"
    _write(good, [{"text": "a b c"}])
    assert _exit_code(["--samples", str(good), "--judge", str(tmp_path / "no-judge-here")]) == 2
    assert "no-judge-here" in capsys.readouterr().err
    assert _exit_code(["--samples", str(good), "--judge", "no-such-org/no-such-judge", "--offline"]) == 2
    err = capsys.readouterr().err
    assert "no-such-org/no-such-judge" in err and "not in the Hugging Face cache" in err
    assert _exit_code(["--samples", str(good), "--judge", str(path), "--batch-size", "0"]) == 2
