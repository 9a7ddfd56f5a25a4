"""``costream prune-llm``: a saved tiny Llama in, a pruned model directory and a table out."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from costream.cli import main
from costream.prune.hf import load_decoder

pytestmark = pytest.mark.usefixtures("one_thread")
TEXT = "\n".join(f"def function_{i}(x, y):\n    return x * {i} + y  # line {i}\n"
                 for i in range(300))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: Any) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    path = tmp_path_factory.mktemp("llm")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.save(str(path / "tokenizer.json"))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=64)).save_pretrained(path)
    (path / "calib.txt").write_text(TEXT)
    (path / "short.txt").write_text("def f(): pass\n")
    return path


def test_prune_llm_writes_a_reloadable_model_and_a_table(model_dir: Any, tmp_path: Any,
                                                         capsys: Any) -> None:
    out = tmp_path / "pruned"
    code = main(["prune-llm", str(model_dir), "--out", str(out), "--sparsity", "0.3",
                 "--calibration", str(model_dir / "calib.txt"), "--candidates", "2",
                 "--seq-len", "16", "--windows", "4", "--eval", str(model_dir / "calib.txt"),
                 "--heal-epochs", "1", "--heal-rank", "2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "| attention+MLP parameters |" in captured.out and "| perplexity |" in captured.out
    assert "scoring 2 candidate calibration sets" in captured.err
    assert "healing" in captured.err
    report = json.loads((out / "pruning.json").read_text())
    assert report["candidate"] in (0, 1) and len(report["candidate_kl"]) == 2
    assert report["removed"] >= 0.3
    small = load_decoder(out)
    assert small.config.model_type == "pruned_llama"
    assert small.config.kv_heads_per_layer == [len(h) for h in report["plan"]["heads"]]
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()


def test_prune_llm_errors_are_one_line(model_dir: Any, tmp_path: Any, capsys: Any) -> None:
    bert_dir = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=32)).save_pretrained(bert_dir)
    cases = [
        (["prune-llm", str(bert_dir), "--out", str(tmp_path / "o1"), "--criterion", "magnitude"],
         "unsupported model family"),
        (["prune-llm", str(model_dir), "--out", str(tmp_path / "o2"), "--calibration",
          str(model_dir / "short.txt")], "calibration text is too short"),
        (["prune-llm", str(model_dir), "--out", str(tmp_path / "o3"), "--criterion",
          "magnitude", "--sparsity", "0.97"], "whole layer's attention"),
        (["prune-llm", str(model_dir), "--out", str(tmp_path / "o4")], "needs --calibration"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("costream prune-llm: error:") and message in err[-1], err
        assert "Traceback" not in "\n".join(err)
