"""Fast defaults decided from the hardware and the model: measured once, remembered, never changing results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rewardlab import speed
from rewardlab.backbones import tiny
from rewardlab.speed import ActivationEstimate, Measurements, choose_speed
from rewardlab.train import train


@pytest.mark.parametrize("flags, precision", [("avx2 avx512_bf16", "bf16-mixed"), ("avx2 amx_bf16", "bf16-mixed"),
                                               ("avx2 avx512f", "32-true")])  # fmt: skip
def test_precision_follows_the_cpus_bf16_instructions(flags, precision, tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor : 0\nflags : fpu {flags}\n")
    monkeypatch.setattr(speed, "Path", lambda p: cpuinfo if p == "/proc/cpuinfo" else Path(p))
    model = tiny("llama", 32, 1, 2, 64, 128, 0.0).model
    chosen, _, why = choose_speed(model, "cpu", "auto", "eager", Measurements(tmp_path / "s.json"))
    assert chosen == precision and ("has avx512_bf16" in why or "amx" in why or "no bf16 instructions" in why)


@pytest.mark.parametrize("eager, sdpa, chosen", [(1.0, 1.2, "eager"), (1.0, 1.03, "sdpa"), (1.3, 1.0, "sdpa")])
def test_eager_only_where_it_measured_clearly_faster_and_remembered(eager, sdpa, chosen, tmp_path, monkeypatch):
    calls = []

    def fake(model, device, precision):
        calls.append(model.config._attn_implementation)
        return eager if calls[-1] == "eager" else sdpa

    monkeypatch.setattr(speed, "_train_step_seconds", fake)
    cache = Measurements(tmp_path / "speed.json")
    model = tiny("llama", 32, 1, 2, 64, 128, 0.0).model
    precision, attention, why = choose_speed(model, "cpu", "32-true", "auto", cache)
    assert (precision, attention) == ("32-true", chosen) and model.config._attn_implementation == chosen
    assert calls == ["eager", "sdpa"] * 3 and "measured now" in why
    again = choose_speed(tiny("llama", 32, 1, 2, 64, 128, 0.0).model, "cpu", "32-true", "auto", cache)
    assert again[1] == chosen and "measured before" in again[2] and len(calls) == 6
    assert len(json.loads((tmp_path / "speed.json").read_text())) == 1


def test_on_a_gpu_bf16_follows_its_support(monkeypatch):
    monkeypatch.setattr(speed.torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(speed, "device_name", lambda accelerator: "H100")
    assert speed.bf16_capable("gpu") == (True, "H100 supports bf16")


def test_a_seeded_run_is_the_same_whether_the_speed_probe_runs_or_was_cached(make_cfg, cache_dir):
    """The probe runs training steps: it must not move the random state the head is initialised from."""
    overrides = ("backbone.num_layers=1", "backbone.hidden_size=48")
    speed_file = cache_dir / "speed.json"
    assert "h48 l1" not in (speed_file.read_text() if speed_file.exists() else "")
    first = train(make_cfg(*overrides, folder="a"))  # measures now: a model shape no test used before
    assert "h48 l1" in speed_file.read_text()
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
