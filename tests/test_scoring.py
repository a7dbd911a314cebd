"""Opening an export folder runs no code from it: only rewardlab's own modeling file, verified byte for byte."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rewardlab.scoring import MODELING_FILE, Scorer, UntrustedExport, modeling_source

from .test_export import export_to, trained  # noqa: F401  (the module-scoped fixture)


@pytest.fixture
def bert_export(trained, tmp_path, cache_dir):  # noqa: F811
    """An encoder export: it carries rewardlab's modeling file (BERT's own head reads [CLS])."""
    export_to(trained["bert"], tmp_path / "export", cache_dir)
    return tmp_path / "export"


def test_rewardlabs_own_modeling_file_opens_without_trust_remote_code(bert_export):
    assert (bert_export / MODELING_FILE).read_text() == modeling_source("bert")
    scorer = Scorer(str(bert_export), trust_remote_code=False, batch_size=4)
    rewards = scorer.score([scorer.encode("Is 7 even or odd?", side)[1] for side in ("odd", "even")])
    assert rewards.shape == (2,) and rewards[0] != rewards[1]


@pytest.mark.parametrize(
    "tamper",
    [
        "modeling file with an extra line",
        "modeling file of another family",
        "auto_map to another module",
        "auto_map to another class",
        "tokenizer auto_map",
    ],
)
def test_a_tampered_export_is_refused_and_runs_nothing(tamper, bert_export, tmp_path):
    marker = tmp_path / "PWNED"
    payload = f"\nimport pathlib; pathlib.Path({str(marker)!r}).touch()\n"
    config = json.loads((bert_export / "config.json").read_text())
    if tamper == "modeling file with an extra line":
        (bert_export / MODELING_FILE).write_text(modeling_source("bert") + payload)
    elif tamper == "modeling file of another family":
        (bert_export / MODELING_FILE).write_text(modeling_source("gpt2"))
    elif tamper == "auto_map to another module":
        (bert_export / "evil.py").write_text(payload)
        config["auto_map"]["AutoModelForSequenceClassification"] = "evil.RewardlabForSequenceClassification"
    elif tamper == "auto_map to another class":
        config["auto_map"]["AutoConfig"] = "modeling_rewardlab.Other"
    else:
        tok = json.loads((bert_export / "tokenizer_config.json").read_text())
        tok["auto_map"] = {"AutoTokenizer": ["evil.Tok", None]}
        (bert_export / "tokenizer_config.json").write_text(json.dumps(tok))
    (bert_export / "config.json").write_text(json.dumps(config))
    with pytest.raises(UntrustedExport, match="trust_remote_code=true only if you trust this folder"):
        Scorer(str(bert_export), trust_remote_code=False, batch_size=4)
    assert not marker.exists()


def test_a_foreign_modeling_file_runs_only_with_trust_remote_code(bert_export, tmp_path, caplog):
    marker = tmp_path / "RAN"
    extra = f"\nimport pathlib; pathlib.Path({str(marker)!r}).touch()\n"
    (bert_export / MODELING_FILE).write_text(modeling_source("bert") + extra)
    Scorer(str(bert_export), trust_remote_code=True, batch_size=4)
    assert marker.exists() and "the modeling code is not rewardlab's" in caplog.text


@pytest.mark.parametrize("family", ["bert; import os", 'bert"\nimport os#', "no_such_family"])
def test_the_modeling_template_takes_only_families_transformers_knows(family):
    with pytest.raises(UntrustedExport, match="backbone family"):
        modeling_source(family)


def test_score_and_serve_start_without_lightning():
    """Inference needs transformers, not the training stack: importing the commands loads no Lightning."""
    code = (
        "import sys, rewardlab.score, rewardlab.serve, rewardlab.scoring, rewardlab.data.formatting; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'torchmetrics')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr[-2000:]
