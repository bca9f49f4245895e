"""The zero-shot suite: each detokeniser rule on literal strings, each corpus loaded from its
fixture (tests/fixtures/zero_shot, written by build_fixtures.py in the real formats), the wrap
layout against a hand-written one, the errors, and the tool's table end to end (no network)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml

from data_pipeline.tokenizers import get_tokenizer
from lomdm_dist.eval import zero_shot
from lomdm_dist.eval.detokenizers import DETOKENIZERS

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "zero_shot"
TOOL = Path(__file__).resolve().parents[1] / "tools" / "evaluate.py"

WIKITEXT_RULES = [
    ("the players ' union", "the players' union"),
    ("a guest @-@ starring role", "a guest-starring role"),
    ("1 @,@ 000 and 3 @.@ 5", "1,000 and 3.5"),
    ("film , television ; theatre : actor . He ! no ? yes", "film, television; theatre: actor. He! no? yes"),
    ("( each ) [ a ] { b }", "(each) [a] {b}"),
    ('he said " hello there " to', 'he said "hello there" to'),
    ("= = = = A = = = =", "==== A ===="),
    ("= = = B = = =", "=== B ==="),
    ("= = C = =", "== C =="),
    ("line \n next", "line\nnext"),
    ("about N people", "about 1 people"),
    ("Boulter 's role", "Boulter's role"),
    ("20 \N{DEGREE SIGN} C", "20\N{DEGREE SIGN}C"),
]
PTB_RULES = [
    ("the company 's shares", "the company's shares"),
    ("the players ' union", "the players' union"),
    ("does n't work", "doesn't work"),
    ("a \n b", "a\nb"),
    ("1\\/2", "1/2"),
    ("rose N N to", "rose 1 1 to"),          # two N sharing a space need the repeated pass
    ("rose $ N to", "rose $1 to"),
    ("ranked # N in", "ranked #1 in"),
    ("the <unk> group", "the ? group"),
]
OTHER_RULES = [
    ("lambada", "  \N{LEFT DOUBLE QUOTATION MARK}Hi\N{RIGHT DOUBLE QUOTATION MARK} she said  ", '\n"Hi" she said'),
    ("lm1b", "it 's fine , right ?", "it's fine, right?"),
    # WikiText's rules run first: its " : " rule leaves LM1B's URL rule nothing to match, so only
    # LM1B's " / " rule applies (once per occurrence), as in MDLM.
    ("scientific_papers", "the value ( 3 @.@ 5 % ) is 3 , see http : / / x.org",
     "the value (3.5 %) is 3, see http:// x.org"),
]


@pytest.mark.parametrize("raw, expected", WIKITEXT_RULES)
def test_wikitext_rules(raw, expected):
    assert DETOKENIZERS["wikitext"](raw) == expected


@pytest.mark.parametrize("raw, expected", PTB_RULES)
def test_ptb_rules(raw, expected):
    assert DETOKENIZERS["ptb"](raw) == expected


@pytest.mark.parametrize("name, raw, expected", OTHER_RULES)
def test_lambada_lm1b_and_scientific_paper_rules(name, raw, expected):
    assert DETOKENIZERS[name](raw) == expected


def _raw_texts(corpus: zero_shot.ZeroShotCorpus) -> list[str]:
    """The fixture's text column read with pyarrow / json directly, not through ``datasets``."""
    import pyarrow.ipc
    import pyarrow.parquet

    root = FIXTURES / corpus.name
    files = sorted(p for p in root.rglob("*") if p.suffix in (".parquet", ".jsonl", ".arrow"))
    assert len(files) == 1, files
    path = files[0]
    if path.suffix == ".parquet":
        return pyarrow.parquet.read_table(path).column(corpus.column).to_pylist()
    if path.suffix == ".jsonl":
        return [json.loads(line)[corpus.column] for line in path.read_text().splitlines()]
    with pyarrow.ipc.open_stream(str(path)) as reader:
        return reader.read_all().column(corpus.column).to_pylist()


@pytest.mark.parametrize("name", list(zero_shot.CORPORA))
def test_each_fixture_loads_detokenised(name):
    corpus = zero_shot.CORPORA[name]
    texts = zero_shot.load_texts(corpus, data_dir=FIXTURES)
    raw = _raw_texts(corpus)
    detokenize = corpus.detokenize() or (lambda t: t)
    assert texts == [detokenize(t) for t in raw] and len(texts) >= 2


def test_wrap_layout_matches_a_hand_written_one():
    docs = [[5, 6, 7], [], [8, 9, 10, 11, 12], [13]]
    rows = zero_shot.layout_rows(docs, seq_len=5, bos=1, eos=2, pad=None)
    stream = [5, 6, 7, 2, 2, 8, 9, 10, 11, 12, 2, 13, 2]          # EOS after every document, empty ones too
    expected = [[1, *stream[i:i + 3], 2] for i in range(0, len(stream) - len(stream) % 3, 3)]
    assert rows.tolist() == expected
    no_eos = zero_shot.layout_rows(docs, seq_len=5, bos=1, eos=2, pad=None, doc_eos=False)
    assert no_eos.tolist() == [[1, 5, 6, 7, 2], [1, 8, 9, 10, 2], [1, 11, 12, 13, 2]]
    padded = zero_shot.layout_rows([[5, 6], [7, 8, 9, 10]], seq_len=5, bos=1, eos=2, pad=0, layout="pad")
    assert padded.tolist() == [[1, 5, 6, 2, 0], [1, 7, 8, 9, 2]]


def test_wrap_drops_a_partial_chunk_per_group_of_documents_as_mdlm():
    """MDLM wraps each datasets.map batch (1,000 documents) on its own, dropping each batch's tail."""
    assert zero_shot.MDLM_GROUP_DOCUMENTS == 1000
    docs = [[5, 6, 7], [8], [9, 10], [11, 12, 13, 14], [15]]
    # Groups of 2 documents, bodies of 3 tokens (seq_len 5), EOS = 2 after each document:
    #   [5 6 7 2 8 2]   -> [5 6 7] [2 8 2]          (nothing dropped)
    #   [9 10 2 11 12 13 14 2] -> [9 10 2] [11 12 13]  (drops 14 2)
    #   [15 2]          -> no row                    (drops 15 2)
    rows = zero_shot.layout_rows(docs, seq_len=5, bos=1, eos=2, pad=None, group_documents=2)
    assert rows.tolist() == [[1, 5, 6, 7, 2], [1, 2, 8, 2, 2], [1, 9, 10, 2, 2], [1, 11, 12, 13, 2]]
    # One group of all five: a stream of 16 tokens makes 5 rows (only the final 2 dropped).
    assert len(zero_shot.layout_rows(docs, seq_len=5, bos=1, eos=2, pad=None, group_documents=5)) == 5
    # Without document EOS: groups [5 6 7 8] -> [5 6 7]; [9 10 11 12 13 14] -> two rows; [15] -> none.
    no_eos = zero_shot.layout_rows(docs, seq_len=5, bos=1, eos=2, pad=None, doc_eos=False, group_documents=2)
    assert no_eos.tolist() == [[1, 5, 6, 7, 2], [1, 9, 10, 11, 2], [1, 12, 13, 14, 2]]


def test_bad_names_and_missing_copies_are_errors_naming_them(tmp_path):
    with pytest.raises(zero_shot.ZeroShotError, match="'ptbx'"):
        zero_shot.resolve_corpora("ptb,ptbx")
    assert [c.name for c in zero_shot.resolve_corpora("zero-shot")] == list(zero_shot.CORPORA)
    with pytest.raises(zero_shot.ZeroShotError, match=str(tmp_path / "lambada")):
        zero_shot.load_texts(zero_shot.CORPORA["lambada"], data_dir=tmp_path)
    with pytest.raises(zero_shot.ZeroShotError, match="no split 'test'"):
        zero_shot.load_texts(zero_shot.CORPORA["ptb"], data_dir=FIXTURES, split="test")
    with pytest.raises(zero_shot.ZeroShotError, match="split 'validation'"):
        zero_shot.load_texts(zero_shot.CORPORA["lambada"], data_dir=FIXTURES, split="validation")


def test_the_tool_prints_the_zero_shot_table(tmp_path, capsys):
    from lomdm_dist.checkpoint.distributed import save_checkpoint
    from lomdm_dist.config import Config, DiffusionConfig, ModelConfig, config_to_dict
    from lomdm_dist.model import build_model

    cfg = Config()
    cfg.model = ModelConfig(n_layers=1, d_model=16, n_heads=2, cond_dim=8, dropout=0.0)
    cfg.diffusion = DiffusionConfig(scheduler="mdlm")
    cfg.data.seq_len = 32
    vocab = get_tokenizer(cfg.data.tokenizer).vocab_size + 1
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.diffusion, vocab)
    save_checkpoint(tmp_path / "run", 1, model_state=model.state_dict(), ema_state=None, trainer_state={},
                    config_yaml=yaml.safe_dump(config_to_dict(cfg)), meta={"vocab_size": vocab}, keep=1)
    spec = importlib.util.spec_from_file_location("evaluate_tool_zero_shot", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "zs.json"
    assert tool.main(["--ckpt", str(tmp_path / "run"), "--data", "zero-shot", "--data-dir", str(FIXTURES),
                      "--max-rows", "2", "--batch-size", "2", "--no-progress", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert [r["dataset"] for r in report["results"]] == list(zero_shot.CORPORA)
    for r in report["results"]:
        assert r["dataset"] in table and r["tokens"] == r["rows"] * 32 and 1 <= r["rows"] <= 2
    # The row count of one corpus, computed here: tokens of the detokenised documents, EOS after each.
    tok = get_tokenizer("gpt2")
    texts = zero_shot.load_texts(zero_shot.CORPORA["wikitext2"], data_dir=FIXTURES)
    stream = sum(len(tok.encode(t)) + 1 for t in texts)
    assert report["results"][1]["rows"] == min(2, stream // 30)
