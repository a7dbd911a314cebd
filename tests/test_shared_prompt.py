"""Shared prompt: one pass per pair over the common prompt gives the two-pass rewards, loss and
gradients; it is used only for backbones where that holds, and only where it saves tokens."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rewardlab.backbones import tiny
from rewardlab.checks import ConfigError
from rewardlab.data.batching import pad_sequences
from rewardlab.shared_prompt import as_kind, decide_sharing, pack

from .conftest import reward_model


def test_pack_lays_out_one_row_per_pair_with_restarting_positions_and_a_mask():
    chosen, rejected = [5, 6, 7, 8], [5, 6, 9]
    ids, mask = pad_sequences([chosen, rejected], pad_id=0)
    packed = pack(ids, mask)
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 2]]
    assert packed.read.tolist() == [3, 4] and packed.tokens == 5
    allowed = packed.attention_mask[0, 0].int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 0, 0, 1],  # the rejected token sees the shared prompt and itself, not chosen's 7, 8
    ]
    additive = as_kind(packed.attention_mask, "additive")[0, 0]
    assert (additive == 0).int().tolist() == allowed and additive.min() == torch.finfo(torch.float32).min


def test_a_response_that_extends_the_other_keeps_its_own_last_token():
    ids, mask = pad_sequences([[1, 2, 3], [1, 2, 3, 4]], pad_id=0)
    packed = pack(ids, mask)
    assert packed.input_ids.tolist() == [[1, 2, 3, 3, 4]]  # shared [1, 2]: chosen's 3 read at 2, rejected's at 4
    assert packed.position_ids.tolist() == [[0, 1, 2, 2, 3]] and packed.read.tolist() == [2, 4]


def two_pass_and_shared(model, seqs):
    ids, mask = pad_sequences(seqs, pad_id=0)
    batch = {"input_ids": ids, "attention_mask": mask}
    model.sharing = False
    two = model.head.reward(model.batch_outputs(dict(batch)))
    model.sharing = True
    shared_batch = dict(batch)
    one = model.head.reward(model.batch_outputs(shared_batch))
    return two, one, shared_batch


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_shared_rewards_loss_and_gradients_equal_two_passes(family, attention, data):
    torch.manual_seed(0)
    model = reward_model(tiny(family, 32, 2, 2, 64, 128, 0.0, attn_implementation=attention).model)
    pairs = data.draw(st.integers(1, 4))
    token = st.integers(3, 200)
    seqs_c, seqs_r = [], []
    for _ in range(pairs):
        prompt = data.draw(st.lists(token, min_size=0, max_size=20))
        seqs_c.append(prompt + data.draw(st.lists(token, min_size=1, max_size=6)))
        seqs_r.append(prompt + data.draw(st.lists(token, min_size=1, max_size=6)))
    if any(c == r for c, r in zip(seqs_c, seqs_r)):
        return
    two, one, _ = two_pass_and_shared(model, seqs_c + seqs_r)
    torch.testing.assert_close(one, two, rtol=1e-4, atol=1e-5)
    grads = []
    for sharing in (False, True):
        model.zero_grad()
        model.sharing = sharing
        ids, mask = pad_sequences(seqs_c + seqs_r, pad_id=0)
        chosen, rejected = model.head.reward(model.batch_outputs({"input_ids": ids, "attention_mask": mask})).chunk(2)
        loss = model.loss_fn(chosen, rejected, torch.zeros(pairs))
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-5, atol=1e-6)
    for shared, two_pass in zip(grads[1][1], grads[0][1]):
        torch.testing.assert_close(shared, two_pass, rtol=1e-3, atol=1e-5)


def test_a_long_shared_prompt_runs_as_one_shorter_pass_and_counts_its_tokens():
    torch.manual_seed(0)
    model = reward_model(tiny("llama", 32, 1, 2, 64, 128, 0.0, attn_implementation="eager").model)
    prompt = list(range(10, 50))
    two, one, batch = two_pass_and_shared(model, [prompt + [3, 4], prompt + [5, 6, 7]])
    torch.testing.assert_close(one, two, rtol=1e-4, atol=1e-5)
    assert batch["padded_tokens"] == batch["processed_real_tokens"] == 40 + 2 + 3  # instead of 2 x 43
    _, _, unshared = two_pass_and_shared(model, [[3, 4, 5], [6, 7, 8]])  # nothing shared: two passes are cheaper
    assert "padded_tokens" not in unshared


@pytest.mark.parametrize(
    ("family", "attention", "expected"),
    [("llama", "eager", True), ("gpt2", "sdpa", True), ("bert", "eager", False), ("bert", "sdpa", False)],
)
def test_only_backbones_whose_packed_pass_is_exact_share(family, attention, expected, caplog):
    """Two layers: an encoder's one-layer reward reads only embeddings of earlier tokens, so it would be exact."""
    torch.manual_seed(0)
    model = reward_model(tiny(family, 32, 2, 2, 64, 128, 0.0, attn_implementation=attention).model)
    with caplog.at_level("INFO"):
        assert decide_sharing(model, "auto") is expected
    assert ("shared prompt: on" if expected else "shared prompt: off") in caplog.text
    assert model.training  # the probe leaves the mode as it found it
    if not expected:
        with pytest.raises(ConfigError, match="model.share_prompt=true: this backbone cannot share"):
            decide_sharing(model, True)


def test_training_with_a_shared_prompt_follows_the_two_pass_run(make_cfg, caplog):
    """fp32: the same training up to rounding (bf16 autocast rounds each pass's own way)."""
    from rewardlab.train import train

    common = ["backbone.family=llama", "backbone.attn_implementation=eager", "trainer.precision=32-true"]
    common += ["trainer.max_steps=4", "test=false"]
    with caplog.at_level("INFO"):
        shared = train(make_cfg(*common, "model.share_prompt=auto", folder="shared"))
    assert "shared prompt: on" in caplog.text
    two = train(make_cfg(*common, "model.share_prompt=false", folder="two"))
    assert shared["val/loss"] == pytest.approx(two["val/loss"], rel=1e-5)
    assert shared["val/acc"] == two["val/acc"]
    assert 0 < shared["train/padding_efficiency"] <= 1 and shared["train/tokens"] == two["train/tokens"]
