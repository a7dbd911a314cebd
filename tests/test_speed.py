"""Fast defaults decided from the hardware and the model: measured once, remembered, never changing results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rewardlab import speed
from rewardlab.backbones import tiny
from rewardlab.speed import ActivationEstimate, Measurements, choose_speed
from rewardlab.train import train


def test_the_fastest_measured_combination_is_chosen_and_remembered(tmp_path, monkeypatch):
    calls = []
    timing = {
        ("32-true", "eager"): 3.0,
        ("32-true", "sdpa"): 2.0,
        ("bf16-mixed", "eager"): 1.0,
        ("bf16-mixed", "sdpa"): 4.0,
    }

    def fake(model, device, precision):
        calls.append((precision, model.config._attn_implementation))
        return timing[calls[-1]]

    monkeypatch.setattr(speed, "_train_step_seconds", fake)
    model = tiny("llama", 32, 1, 2, 64, 128, 0.0).model
    cache = Measurements(tmp_path)
    precision, attention, why = choose_speed(model, "cpu", "auto", "auto", cache)
    assert (precision, attention) == ("bf16-mixed", "eager") and model.config._attn_implementation == "eager"
    assert "measured now" in why and "32-true sdpa 2.00x" in why and len(calls) == 4
    again = choose_speed(tiny("llama", 32, 1, 2, 64, 128, 0.0).model, "cpu", "auto", "auto", cache)
    assert again[:2] == ("bf16-mixed", "eager") and "measured before" in again[2] and len(calls) == 4
    fixed = choose_speed(tiny("llama", 32, 1, 2, 64, 128, 0.0).model, "cpu", "32-true", "auto", cache)
    assert fixed[:2] == ("32-true", "sdpa") and len(calls) == 6  # only what is left auto is measured
    assert len(json.loads((tmp_path / "speed.json").read_text())) == 2


def test_on_a_gpu_with_bf16_only_attention_is_measured(tmp_path, monkeypatch):
    from contextlib import nullcontext

    monkeypatch.setattr(speed.torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(speed.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(speed.torch.random, "fork_rng", lambda devices: nullcontext())
    monkeypatch.setattr(speed, "device_name", lambda accelerator: "H100")
    monkeypatch.setattr(speed, "_train_step_seconds", lambda model, device, precision: 1.0)
    precision, _, _ = choose_speed(
        tiny("llama", 32, 1, 2, 64, 128, 0.0).model, "gpu", "auto", "auto", Measurements(tmp_path)
    )
    assert precision == "bf16-mixed"


def test_a_seeded_run_is_the_same_whether_the_speed_probe_runs_or_was_cached(make_cfg, cache_dir):
    """The probe runs training steps: it must not move the random state the head is initialised from."""
    overrides = ("backbone.num_layers=1", "backbone.hidden_size=48")
    assert "h48 l1" not in (cache_dir / "speed.json").read_text() if (cache_dir / "speed.json").exists() else True
    first = train(make_cfg(*overrides, folder="a"))  # measures now: a model shape no test used before
    assert "h48 l1" in (cache_dir / "speed.json").read_text()
    second = train(make_cfg(*overrides, folder="b"))  # reads the measurement
    assert first["val/loss"] == second["val/loss"] and first["train/loss"] == second["train/loss"]


def test_the_start_log_says_what_was_chosen_and_why(make_cfg, caplog):
    with caplog.at_level("INFO"):
        train(make_cfg("trainer.precision=32-true", "backbone.attn_implementation=eager"))
    assert (
        "speed settings: precision 32-true, attention eager (as configured); gradient checkpointing auto" in caplog.text
    )
    assert "gradient checkpointing auto: off, and on only for a batch whose activations" in caplog.text


def test_checkpointing_switches_on_only_for_batches_that_would_not_fit(make_cfg, monkeypatch, caplog, tmp_path):
    estimate = ActivationEstimate(layers=2, hidden=64, heads=4, bytes_per_value=4)
    small, big = estimate.bytes(32, 20), estimate.bytes(32, 200)
    assert 0 < small < big and estimate.bytes(32, 40) > 2 * estimate.bytes(32, 20)  # attention grows with length
    monkeypatch.setattr("rewardlab.model.free_memory_bytes", lambda accelerator: 2 * estimate.bytes(32, 12))
    with caplog.at_level("INFO"):
        checkpointed = train(make_cfg("trainer.precision=32-true", "data.max_length=256", folder="auto"))
    assert "gradient checkpointing on: a batch of 32 x" in caplog.text  # the quiz's longest batches
    plain = train(make_cfg("trainer.precision=32-true", "model.gradient_checkpointing=false", folder="off"))
    assert checkpointed["val/loss"] == pytest.approx(plain["val/loss"], abs=1e-5)  # the same math, less memory
    assert Path(tmp_path / "auto" / "results.json").exists()
