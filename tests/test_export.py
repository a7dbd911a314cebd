"""Evaluate, export and score: plain transformers must give rewardlab's scores (serving: test_serve.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rewardlab.data.batching import pad_sequences
from rewardlab.eval import calibration, evaluate
from rewardlab.export import PAD_TOKEN, choose_pad, export
from rewardlab.run import load_run
from rewardlab.score import score_file
from rewardlab.train import train

from .conftest import compose_config
from .test_train import run_cli

QUIZ = Path(__file__).resolve().parent.parent / "rewardlab" / "assets" / "quiz"
FAMILIES = {
    "llama": False,
    "bert": True,
    "bert-last": True,
}  # family -> needs trust_remote_code (BERT's own head reads [CLS])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict[str, Path]:
    """A tiny decoder, encoder and LoRA model, each trained for 30 steps: their last checkpoints."""
    out = {}
    for name, overrides in {
        "llama": [],
        "bert": ["backbone.family=bert"],  # pooling auto: first ([CLS]), for an encoder
        "bert-last": ["backbone.family=bert", "model.pooling=last"],
        "lora": ["freeze=lora"],
    }.items():
        run = tmp_path_factory.mktemp(f"run-{name}")
        cfg = compose_config(
            "train",
            [
                "logger=none",
                "trainer.max_steps=30",
                "trainer.limit_val_batches=4",
                "trainer.limit_test_batches=2",
                "~callbacks.progress_bar",
                *overrides,
            ],
            run,
            cache_dir,
        )
        train(cfg)
        out[name] = run / "checkpoints" / "last.ckpt"
    return out


def export_to(ckpt: Path, folder: Path, cache_dir: Path, *overrides: str) -> dict:
    cfg = compose_config(
        "export", [f"ckpt_path={ckpt}", f"output_dir={folder}", *overrides], folder.parent / "x", cache_dir
    )
    return export(cfg)


def quiz_rows(n: int) -> list[dict]:
    return [json.loads(line) for line in (QUIZ / "test.jsonl").read_text().splitlines()[:n]]


@pytest.mark.parametrize("family", ["llama", "bert", "lora"])
def test_export_loads_in_plain_transformers_with_identical_scores(family, trained, tmp_path, cache_dir):
    remote = FAMILIES.get(family, False)
    info = export_to(trained[family], tmp_path / "export", cache_dir)
    assert info["remote_code"] == remote and info["parity_max_abs_diff"] < 1e-4
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "export", trust_remote_code=remote).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "export", trust_remote_code=remote)
    assert hf.config.num_labels == 1 and hf.config.pad_token_id == tok.pad_token_id is not None
    assert hf.config.reward_std > 0 and hf.config.rewardlab["format"] == "sep" and tok.chat_template
    if not remote:
        assert type(hf).__name__ == "LlamaForSequenceClassification" and hf.score.weight.shape == (1, 32 * 2)

    _, model, _ = load_run(str(trained[family]))
    rows = quiz_rows(20)
    texts = [f"[BOS]{r['prompt']}[SEP]{r[side]}[EOS]" for r in rows for side in ("chosen", "rejected")]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    with torch.no_grad():
        ours = model(*pad_sequences(ids, tok.pad_token_id))
        for side in ("right", "left"):
            input_ids, mask = pad_sequences(ids, tok.pad_token_id, side)
            theirs = hf(input_ids=input_ids, attention_mask=mask).logits[:, 0]
            assert torch.allclose(theirs, ours, atol=1e-4), (side, (theirs - ours).abs().max())

    # score 40 rows: one output row per input row, `text` gives exactly the scored ids
    (tmp_path / "in.jsonl").write_text(
        "".join(
            json.dumps({"prompt": r["prompt"], "response": r[side]}) + "\n"
            for r in rows
            for side in ("chosen", "rejected")
        )
    )
    cfg = compose_config(
        "score",
        [
            f"model_dir={tmp_path / 'export'}",
            f"input={tmp_path / 'in.jsonl'}",
            f"output={tmp_path / 'out.jsonl'}",
            f"trust_remote_code={remote}",
        ],
        tmp_path / "s",
        cache_dir,
    )
    assert score_file(cfg) == {"rows": 40, "scored": 40, "errors": 0}
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["response"] for o in out] == [r[side] for r in rows for side in ("chosen", "rejected")]
    assert [o["text"] for o in out] == texts
    assert np.allclose([o["reward"] for o in out], ours.numpy(), atol=1e-4)
    mean, std = hf.config.reward_mean, hf.config.reward_std
    assert np.allclose([o["reward_normalized"] for o in out], (ours.numpy() - mean) / std, atol=1e-4)


def test_export_without_trust_remote_code_refuses_instead_of_building_an_untrained_model(trained, tmp_path, cache_dir):
    export_to(trained["bert"], tmp_path / "export", cache_dir)
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "export")
    with pytest.raises(ValueError, match="remote_code=auto"):
        export_to(trained["bert"], tmp_path / "native", cache_dir, "remote_code=never")


def test_pad_token_that_is_eos_is_replaced_by_one_that_never_occurs(tiny_tokenizer):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer.name_or_path)
    seqs = [np.array([1, 40, 3, 50, 2])]
    assert choose_pad(tok, seqs) is False and tok.pad_token == "[PAD]"  # its own, unused pad stays
    tok.pad_token = tok.eos_token  # as SmolLM2 ships: pad == EOS, which ends every sequence
    assert choose_pad(tok, seqs) is True and tok.pad_token == PAD_TOKEN and tok.pad_token_id == len(tok) - 1


def test_eval_is_independent_of_batch_size_and_padding_side(trained, tmp_path, cache_dir):
    results = {}
    for batch in (1, 16):
        for side in ("right", "left"):
            overrides = [f"data.eval_batch_size={batch}", f"data.padding_side={side}"]
            cfg = compose_config(
                "eval",
                [f"ckpt_path={trained['llama']}", "logger=none", *overrides],
                tmp_path / f"{batch}{side}",
                cache_dir,
            )
            results[batch, side] = evaluate(cfg, overrides)
            rewards = [json.loads(x) for x in (tmp_path / f"{batch}{side}" / "rewards.jsonl").read_text().splitlines()]
            results[batch, side]["rewards"] = np.array([[r["chosen"], r["rejected"]] for r in rewards])
    base = results[16, "right"]
    for key, other in results.items():
        assert np.allclose(other["rewards"], base["rewards"], atol=1e-5), key
        assert other["accuracy"] == base["accuracy"] and other["ties"] == base["ties"]
    out = tmp_path / "16right"
    saved = json.loads((out / "eval.json").read_text())
    assert saved["pairs"] == 500 and set(saved["accuracy_per_subset"]) == {"compare", "opposite", "parity", "successor"}
    assert 0 <= saved["ece"] <= 1 and saved["calibration"] and "longer_wins_accuracy" in saved
    assert (out / "reliability.png").stat().st_size > 5000 and (out / "rewards.png").stat().st_size > 5000
    subset = saved["accuracy_per_subset"]
    assert saved["accuracy"] == pytest.approx(np.mean(list(subset.values())), abs=0.02)  # 125 pairs per subset


def test_length_bias_metric_sees_a_model_that_only_likes_length(trained, tmp_path, cache_dir):
    rows = [{"prompt": f"q{i}", "chosen": "yes " * (3 + i % 5), "rejected": "no"} for i in range(30)]
    (tmp_path / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose_config(
        "eval",
        [f"ckpt_path={trained['llama']}", "logger=none", f"data.test_file={tmp_path}/long.jsonl"],
        tmp_path / "e",
        cache_dir,
    )
    result = evaluate(cfg, [f"data.test_file={tmp_path}/long.jsonl"])
    assert result["longer_wins_accuracy"] == 1.0 and result["length_ties"] == 0 and result["pairs"] == 30


def test_calibration_by_hand():
    p = np.array([0.9, 0.9, 0.2, 0.6])  # confidences 0.9, 0.9, 0.8, 0.6; right, right, wrong, right
    ece, table = calibration(p, bins=5)  # bins of width 0.1 over [0.5, 1]
    assert [t["pairs"] for t in table] == [1, 1, 2]
    assert ece == pytest.approx(0.25 * abs(1 - 0.6) + 0.25 * abs(0 - 0.8) + 0.5 * abs(1 - 0.9))


def test_cli_chain_export_eval_score(trained, tmp_path):
    ckpt = trained["llama"]
    done = run_cli(
        f"ckpt_path={ckpt}",
        f"output_dir={tmp_path / 'export'}",
        f"hydra.run.dir={tmp_path / 'x'}",
        module="rewardlab.export",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    done = run_cli(
        f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'eval'}", "data.eval_batch_size=7", module="rewardlab.eval"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["pairs"] == 500
    assert (tmp_path / "eval" / "csv" / "version_0" / "metrics.csv").read_text().count("eval/accuracy") == 1
    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "Is 4 even?", "response": "even"}) + "\n")
    done = run_cli(
        f"model_dir={tmp_path / 'export'}",
        f"input={tmp_path / 'in.jsonl'}",
        f"output={tmp_path / 'out.jsonl'}",
        f"hydra.run.dir={tmp_path / 's'}",
        module="rewardlab.score",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "reward" in json.loads((tmp_path / "out.jsonl").read_text())


@pytest.mark.parametrize("family", ["llama", "bert-last"])
def test_trl_ppo_get_reward_reads_the_same_scores(family, trained, tmp_path, cache_dir):
    """TRL's PPO/RLOO path: backbone via base_model_prefix, head via `model.score` at the last token,
    right padding; so for last-token pooling (an encoder pooled otherwise says so when exported)."""
    utils = pytest.importorskip("trl.experimental.utils")
    remote = FAMILIES[family]
    export_to(trained[family], tmp_path / "export", cache_dir)
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "export", trust_remote_code=remote).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "export", trust_remote_code=remote)
    prompt = tok("[BOS]Is 7 even or odd?[SEP]", add_special_tokens=False)["input_ids"]
    responses = [tok(r, add_special_tokens=False)["input_ids"] for r in ("odd[EOS]", "even, I think so[EOS]")]
    width = max(map(len, responses))
    query_responses = torch.tensor([prompt + r + [tok.pad_token_id] * (width - len(r)) for r in responses])
    _, model, _ = load_run(str(trained[family]))
    with torch.no_grad():
        _, trl_scores, _ = utils.get_reward(hf, query_responses, tok.pad_token_id, len(prompt))
        ours = model(query_responses, (query_responses != tok.pad_token_id).long())
    assert torch.allclose(trl_scores, ours, atol=1e-4)


def test_an_encoder_export_says_its_pooling_and_that_ppo_reads_the_last_token(trained, tmp_path, cache_dir, caplog):
    with caplog.at_level("WARNING"):
        info = export_to(trained["bert"], tmp_path / "export", cache_dir)
    assert info["pooling"] == "first" and info["remote_code"] is True
    assert "TRL's PPO/RLOO get_reward and OpenRLHF read a score at the last token" in caplog.text
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["rewardlab_pooling"] == "first"


def test_export_never_replaces_what_is_not_an_earlier_export(trained, tmp_path, cache_dir):
    run = trained["llama"].parent.parent  # the run folder holding the checkpoint
    with pytest.raises(FileExistsError, match="holds the checkpoint being exported"):
        export_to(trained["llama"], run, cache_dir, "overwrite=true")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "paper.tex").write_text("months of work")
    with pytest.raises(FileExistsError, match="not a rewardlab export"):
        export_to(trained["llama"], other, cache_dir, "overwrite=true")
    assert (other / "paper.tex").read_text() == "months of work"


def test_a_failed_export_leaves_the_earlier_one_whole(trained, tmp_path, cache_dir):
    out = tmp_path / "export"
    export_to(trained["llama"], out, cache_dir)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(RuntimeError, match="does not reproduce"):
        export_to(trained["llama"], out, cache_dir, "overwrite=true", "tolerance=-1")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no half-written folder left
    export_to(trained["llama"], out, cache_dir, "overwrite=true")
    assert (out / "rewardlab_export.json").exists()


def test_overwrite_refuses_files_the_earlier_export_did_not_write(trained, tmp_path, cache_dir):
    out = tmp_path / "export"
    export_to(trained["llama"], out, cache_dir)
    assert oct(out.stat().st_mode & 0o777) != oct(0o700)  # readable as other folders are, not private
    (out / "README.md").write_text("my notes on this model")
    with pytest.raises(FileExistsError, match=r"did not write \(README.md\)"):
        export_to(trained["llama"], out, cache_dir, "overwrite=true")
    assert (out / "README.md").read_text() == "my notes on this model"


def test_the_modeling_file_goes_with_the_process(tmp_path):
    """Each process that exports or opens an export writes rewardlab's modeling file to a private folder;
    none is left behind in the temporary directory."""
    import subprocess
    import sys

    code = "from rewardlab.scoring import modeling_module; print(modeling_module('bert').__file__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    path = Path(done.stdout.strip())
    assert path.name == "modeling_rewardlab.py" and path.parent.name.startswith("rewardlab-modeling-")
    assert not path.parent.exists()
