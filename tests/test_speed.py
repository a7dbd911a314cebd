"""Fast defaults decided from the hardware and the model: measured once, remembered, never changing results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rewardlab import speed
from rewardlab.backbones import tiny
from rewardlab.speed import ActivationEstimate, Measurements, choose_speed
from rewardlab.train import train


@pytest.mark.parametrize(
    "flags, bf16_seconds, precision",
    [
        ("avx2 avx512_bf16", 0.5, "bf16-mixed"),
        ("avx2 amx_bf16", 0.9, "bf16-mixed"),
        ("avx2 avx512_bf16", 0.97, "32-true"),  # bf16 instructions, but not 5% faster for this model
        ("avx2 avx512_bf16", 1.7, "32-true"),  # small models: autocast's casts cost more than they save
        ("avx2 avx512f", 0.5, "32-true"),  # no bf16 instructions: nothing measured
    ],
)
def test_precision_is_bf16_where_the_cpu_has_it_and_a_step_measured_faster(
    flags, bf16_seconds, precision, tmp_path, monkeypatch
):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor : 0\nflags : fpu {flags}\n")
    monkeypatch.setattr(speed, "Path", lambda p: cpuinfo if p == "/proc/cpuinfo" else Path(p))
    calls = []

    def fake(model, device, precision, width):
        calls.append((precision, width))
        return bf16_seconds if precision == "bf16-mixed" else 1.0

    monkeypatch.setattr(speed, "_train_step_seconds", fake)
    cache = Measurements(tmp_path / "s.json")
    model = tiny("llama", 32, 1, 2, 64, 128, 0.0).model
    chosen, _, _, why = choose_speed(model, "cpu", "auto", "eager", cache)
    assert chosen == precision
    if "bf16" in flags:
        assert calls == [("32-true", 128), ("bf16-mixed", 128)] * 3
        assert f"ran {1 / bf16_seconds:.2f}x as fast in bf16 as in fp32 (measured now" in why
        again = choose_speed(tiny("llama", 32, 1, 2, 64, 128, 0.0).model, "cpu", "auto", "eager", cache)
        assert again[0] == precision and "measured before" in again[3] and len(calls) == 6
    else:
        assert calls == [] and "no bf16 instructions" in why


@pytest.mark.parametrize(
    "eager, sdpa, chosen, up_to",
    [
        ({64: 1.0, 128: 2.0, 256: 4.0}, {64: 1.2, 128: 2.4, 256: 4.8}, "eager", None),  # eager faster at every width
        ({64: 1.0, 128: 2.0, 256: 4.0}, {64: 1.03, 128: 2.06, 256: 4.1}, "sdpa", None),  # not 5% faster anywhere
        ({64: 1.3, 128: 2.0, 256: 4.0}, {64: 1.0, 128: 3.0, 256: 5.0}, "sdpa", None),  # short passes decide first
        ({64: 1.0, 128: 2.0, 256: 5.0}, {64: 1.2, 128: 2.4, 256: 4.5}, "eager", 192),  # long passes: sdpa
        ({64: 1.0, 128: 2.0, 256: 5.0}, {64: 1.2, 128: 1.9, 256: 4.5}, "eager", 96),
    ],
)
def test_attention_by_width_where_measured_clearly_faster_and_remembered(
    eager, sdpa, chosen, up_to, tmp_path, monkeypatch
):
    calls = []

    def fake(model, device, precision, width):
        calls.append((model.config._attn_implementation, width))
        return (eager if calls[-1][0] == "eager" else sdpa)[width]

    monkeypatch.setattr(speed, "_train_step_seconds", fake)
    cache = Measurements(tmp_path / "speed.json")
    model = tiny("llama", 32, 1, 2, 64, 128, 0.0).model
    precision, attention, eager_up_to, why = choose_speed(model, "cpu", "32-true", "auto", cache)
    assert (precision, attention, eager_up_to) == ("32-true", chosen, up_to)
    assert model.config._attn_implementation == chosen
    assert calls == [(a, w) for w in (64, 128, 256) for a in ("eager", "sdpa")] * 3 and "measured now" in why
    again = choose_speed(tiny("llama", 32, 1, 2, 64, 128, 0.0).model, "cpu", "32-true", "auto", cache)
    assert again[1:3] == (chosen, up_to) and "measured before" in again[3] and len(calls) == 18
    assert len(json.loads((tmp_path / "speed.json").read_text())) == 1


def test_a_measured_switch_runs_short_passes_eager_and_long_ones_sdpa_with_the_same_rewards():
    import torch

    from .conftest import reward_model

    torch.manual_seed(0)
    model = reward_model(tiny("llama", 32, 2, 2, 64, 128, 0.0, attn_implementation="eager").model).eval()
    model.eager_up_to = 8
    ids = torch.randint(3, 200, (2, 12))
    long_mask, short_mask = torch.ones(2, 12, dtype=torch.long), torch.ones(2, 6, dtype=torch.long)
    with torch.no_grad():
        long = model(ids, long_mask)
        assert model.backbone.config._attn_implementation == "sdpa"
        short = model(ids[:, :6], short_mask)
        assert model.backbone.config._attn_implementation == "eager"
        model.eager_up_to = None
        model.backbone.set_attn_implementation("eager")
        torch.testing.assert_close(model(ids, long_mask), long, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model(ids[:, :6], short_mask), short, rtol=1e-5, atol=1e-6)


def test_the_cpu_kernel_cache_is_set_unless_the_environment_says(monkeypatch):
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    assert speed.limit_kernel_cache(32) == "oneDNN kernel cache 32"
    assert speed.os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "32"
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "7")
    assert speed.limit_kernel_cache(32) == "oneDNN kernel cache 7 (from the environment)"
    assert speed.limit_kernel_cache(None) == "oneDNN kernel cache as oneDNN decides"


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


def test_on_a_gpu_bf16_is_chosen_by_support_without_a_probe(tmp_path, monkeypatch):
    """A short step on a GPU is bound by kernel launches and would understate bf16 (4x at real sizes)."""
    monkeypatch.setattr(speed.torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(speed, "device_name", lambda accelerator: "H100")
    monkeypatch.setattr(speed, "_train_step_seconds", lambda *a: pytest.fail("probed on a GPU"))
    model = tiny("llama", 32, 1, 2, 64, 128, 0.0).model
    chosen, _, _, why = choose_speed(model, "gpu", "auto", "eager", Measurements(tmp_path / "s.json"))
    assert chosen == "bf16-mixed" and why == "bf16-mixed: H100 supports bf16"


@pytest.mark.parametrize(
    "content",
    [
        "",  # a run killed while writing (before writes were atomic)
        '{"a": ',
        "[1, 2]",
        "\xff\xfe",
        None,  # the entry: a list of 3, strings, zero, negative, NaN, infinity, booleans, null
    ],
)
def test_a_speed_file_that_is_not_measurements_is_measured_again_never_trusted(content, tmp_path, monkeypatch, caplog):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags : avx512_bf16\n")
    monkeypatch.setattr(speed, "Path", lambda p: cpuinfo if p == "/proc/cpuinfo" else Path(p))
    monkeypatch.setattr(speed, "_train_step_seconds", lambda m, d, precision, w: 0.5 if "bf16" in precision else 1.0)
    path = tmp_path / "speed.json"
    model = tiny("llama", 32, 1, 2, 64, 128, 0.0).model
    if content is not None:
        path.write_text(content, encoding="latin-1")
        bad_entries = ["the whole file"]
    else:
        choose_speed(model, "cpu", "auto", "eager", Measurements(path))
        (key,) = json.loads(path.read_text())
        bad_entries = [[1, 2, 3], ["1", "0.5"], [0, 0.5], [-1.0, -0.5], [float("nan"), 1.0], [1e999, 0.5],
                       [True, False], None]  # fmt: skip
    for bad in bad_entries:
        if bad != "the whole file":
            path.write_text(json.dumps({key: bad}))
        with caplog.at_level("WARNING"):
            chosen, _, _, why = choose_speed(model, "cpu", "auto", "eager", Measurements(path))
        assert chosen == "bf16-mixed" and "ran 2.00x as fast in bf16 as in fp32 (measured now" in why
        assert str(path) in caplog.text and "measuring again" in caplog.text
        assert list(json.loads(path.read_text()).values()) == [[1.0, 0.5]]  # replaced, whole
        caplog.clear()
