"""The reward is read from the last real token, whatever the padding, in one forward pass."""

import pytest
import torch

from rewardlab.backbones import tiny
from rewardlab.checks import ConfigError
from rewardlab.data.batching import PairCollator
from rewardlab.metrics import PairMetrics
from rewardlab.model import RewardModel
from rewardlab.pooling import last_token_index, position_ids

from .conftest import reward_model

FAMILIES = ["llama", "gpt2", "bert"]


def build(family: str, seed: int = 0, head_lr_mult: float = 1.0) -> RewardModel:
    torch.manual_seed(seed)
    return reward_model(tiny(family, 32, 2, 4, 64, 128, 0.0, 0.12).model, head_lr_mult=head_lr_mult).eval()


SEQS = [[1, 50, 60, 70, 2], [1, 80, 2], [1, 90, 91, 92, 93, 94, 95, 2]]


def padded(seqs: list[list[int]], side: str, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        span = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, span], mask[i, span] = torch.tensor(s), 1
    return ids, mask


def test_last_token_index_right_left_and_full():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 4, 4, 1]
    assert position_ids(torch.tensor([[0, 0, 1, 1, 1]])).tolist() == [[0, 0, 0, 1, 2]]


@pytest.mark.parametrize("family", FAMILIES)
def test_reward_is_head_of_last_real_token(family):
    model = build(family)
    seq = torch.tensor([SEQS[0]])
    with torch.no_grad():
        hidden = model.backbone(input_ids=seq, attention_mask=torch.ones_like(seq)).last_hidden_state
        expected = model.head(hidden[0, -1]).item()
        ids, mask = padded(SEQS, "right")
        assert model(ids, mask)[0].item() == pytest.approx(expected, abs=1e-5)
        # the token read is the last real one: changing padding changes nothing, changing EOS does
        ids[0, len(SEQS[0]) :] = 77
        assert model(ids, mask)[0].item() == pytest.approx(expected, abs=1e-5)
        ids[0, len(SEQS[0]) - 1] = 3
        assert model(ids, mask)[0].item() != pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_left_and_right_padding_give_the_same_reward(family):
    model = build(family)
    with torch.no_grad():
        right = model(*padded(SEQS, "right"))
        left = model(*padded(SEQS, "left"))
        alone = torch.cat([model(*padded([s], "right")) for s in SEQS])
    assert torch.allclose(right, left, atol=1e-5)
    assert torch.allclose(right, alone, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_one_concatenated_pass_equals_two_separate_passes(family):
    model = build(family)
    chosen, rejected = SEQS, [[1, 40, 2], [1, 41, 42, 43, 44, 45, 46, 47, 48, 2], [1, 5, 6, 2]]
    items = [{"chosen": c, "rejected": r, "margin": 0.0, "index": i} for i, (c, r) in enumerate(zip(chosen, rejected))]
    batch = PairCollator(0, "right", None, 1, 0)(items)
    assert batch["input_ids"].shape == (6, 10)
    with torch.no_grad():
        joint_c, joint_r = (model.head.reward(o) for o in model.pair_outputs(batch))
        sep_c, sep_r = model(*padded(chosen, "right")), model(*padded(rejected, "right"))
    assert torch.allclose(joint_c, sep_c, atol=1e-5)
    assert torch.allclose(joint_r, sep_r, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["right", "left"])
def test_a_batch_run_in_length_chunks_gives_the_same_rewards_loss_and_gradients(family, side):
    model = build(family)
    model.train()
    chosen, rejected = SEQS, [[1, 40, 2], [1, 41, 42, 43, 44, 45, 46, 47, 48, 2], [1, 5, 6, 2]]
    items = [{"chosen": c, "rejected": r, "margin": 0.0, "index": i} for i, (c, r) in enumerate(zip(chosen, rejected))]
    results = []
    for max_chunks in (1, 3):
        batch = PairCollator(0, side, None, max_chunks, 0)(items)
        assert ("chunks" in batch) == (max_chunks > 1)
        model.zero_grad()
        c, r = (model.head.reward(o) for o in model.pair_outputs(batch))
        loss = model.loss_fn(c, r, batch["margin"])
        loss.backward()
        results.append((c.detach(), r.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (c1, r1, g1), (c3, r3, g3) = results
    assert torch.allclose(c1, c3, atol=1e-5) and torch.allclose(r1, r3, atol=1e-5)
    assert len(g1) == len(g3) and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g1, g3))


def test_head_is_linear_without_bias_and_rewards_are_float32():
    model = build("llama")
    assert [n for n, _ in model.head.named_parameters()] == ["weight"] and model.head.weight.shape == (1, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        r = model(*padded(SEQS, "right"))
    assert r.dtype == torch.float32 and r.shape == (3,)


def test_parameter_groups_skip_decay_for_biases_and_norms_and_scale_head_lr():
    model = build("gpt2", head_lr_mult=10.0)
    groups = model.parameter_groups()
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay, head = ([names[id(p)] for p in g["params"]] for g in groups)
    assert all(model.get_parameter(n).ndim == 2 for n in decay) and "backbone.wte.weight" in decay
    assert any(n.endswith(".bias") for n in no_decay) and any("ln_" in n for n in no_decay)
    assert groups[1]["weight_decay"] == 0.0
    assert head == ["head.weight"] and groups[2]["lr"] == pytest.approx(1e-2)
    assert len(decay) + len(no_decay) + len(head) == len(list(model.parameters()))


def test_pair_metrics_count_ties_as_wrong_and_match_torch():
    m = PairMetrics()
    chosen, rejected = torch.tensor([2.0, 1.0, 0.5]), torch.tensor([1.0, 1.0, 1.5])
    m.update(chosen[:2], rejected[:2], torch.tensor(0.4))
    m.update(chosen[2:], rejected[2:], torch.tensor(0.1))
    out = m.compute()
    assert out["acc"].item() == pytest.approx(1 / 3)  # the tie (1.0 vs 1.0) is wrong
    assert out["loss"].item() == pytest.approx((0.4 * 2 + 0.1) / 3)
    assert out["margin"].item() == pytest.approx((1.0 + 0.0 - 1.0) / 3)
    assert out["reward_chosen"].item() == pytest.approx(3.5 / 3)
    assert out["reward_rejected"].item() == pytest.approx(3.5 / 3)
    assert out["reward_std"].item() == pytest.approx(torch.cat([chosen, rejected]).std(unbiased=False).item())


@pytest.mark.parametrize(("family", "expected"), [("llama", "last"), ("gpt2", "last"), ("bert", "first")])
def test_pooling_auto_reads_the_last_token_of_decoders_and_the_first_of_encoders(family, expected):
    from rewardlab.pooling import choose_pooling

    torch.manual_seed(0)
    backbone = tiny(family, 32, 1, 4, 64, 128, 0.1, 0.12).model.train()
    state = torch.get_rng_state()
    assert choose_pooling(backbone, "auto") == expected
    assert torch.equal(torch.get_rng_state(), state) and backbone.training  # no draw, mode kept
    assert choose_pooling(backbone, "mean") == "mean"
    with pytest.raises(ConfigError, match="model.pooling: expected auto or one of last, mean, first, got 'cls'"):
        choose_pooling(backbone, "cls")


@pytest.mark.parametrize("pooling", ["mean", "first"])
@pytest.mark.parametrize("family", FAMILIES)
def test_mean_and_first_pooling_read_only_real_tokens_whatever_the_padding(family, pooling):
    model = build(family)
    model.pooling = pooling
    with torch.no_grad():
        hidden = [model.backbone(input_ids=torch.tensor([s]), attention_mask=torch.ones(1, len(s))).last_hidden_state[0]
                  for s in SEQS]  # fmt: skip
        expected = torch.stack([h.mean(0) if pooling == "mean" else h[0] for h in hidden]) @ model.head.weight[0]
        for side in ("right", "left"):
            ids, mask = padded(SEQS, side, pad=77)
            torch.testing.assert_close(model(ids, mask), expected, rtol=1e-4, atol=1e-5)
