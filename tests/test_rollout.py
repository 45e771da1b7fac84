"""Response mask, batch assembly and the engine-independent parts of the vLLM rollout."""

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from g2rl.rollout import (
    PINNED_VLLM_VERSION,
    RolloutBatch,
    build_batch,
    cut_at_eos,
    generation_eos_ids,
    make_rollout,
    response_mask,
)
from g2rl.rollout.vllm import (
    VLLMRollout,
    import_vllm,
    named_weights_for_vllm,
    outputs_to_completions,
)

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def test_response_mask_several_eos_ids():
    ids = torch.tensor([
        [5, 6, 2, 7, 8],   # EOS id 2 at position 2
        [5, 1, 6, 2, 7],   # EOS id 1 at position 1 (first of several)
        [5, 6, 7, 8, 9],   # no EOS: truncated
    ])
    mask, trunc = response_mask(ids, [1, 2])
    assert mask.tolist() == [
        [True, True, True, False, False],
        [True, True, False, False, False],
        [True, True, True, True, True],
    ]
    assert trunc.tolist() == [False, False, True]


def test_response_mask_pad_equals_eos():
    eos = 0
    ids = torch.tensor([[4, 5, eos, eos, eos], [4, eos, eos, eos, eos], [4, 5, 6, 7, eos]])
    mask, trunc = response_mask(ids, [eos])
    assert mask.sum(1).tolist() == [3, 2, 5]  # the first EOS is kept, the padding is not
    assert trunc.tolist() == [False, False, False]


def test_response_mask_eos_at_position_zero_and_empty():
    mask, trunc = response_mask(torch.tensor([[2, 3, 4], [2, 2, 2]]), [2])
    assert mask.tolist() == [[True, False, False], [True, False, False]]
    assert trunc.tolist() == [False, False]
    mask, trunc = response_mask(torch.zeros((2, 0), dtype=torch.long), [2])
    assert mask.shape == (2, 0) and trunc.tolist() == [True, True]


def test_response_mask_errors():
    with pytest.raises(ValueError, match="empty"):
        response_mask(torch.tensor([[1]]), [])
    with pytest.raises(ValueError, match=r"\(N, L\)"):
        response_mask(torch.tensor([1, 2]), [1])


def test_response_mask_agrees_with_cut_at_eos():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 6, (50, 9), generator=g)
    mask, trunc = response_mask(ids, [0, 3])
    for row, m, t in zip(ids.tolist(), mask, trunc, strict=True):
        cut, tr = cut_at_eos(row, [0, 3])
        assert int(m.sum()) == len(cut) and bool(t) == tr
        assert row[: len(cut)] == cut


def test_build_batch_groups_by_prompt():
    prompts = [[10, 11], [12]]
    completions = [[5, 2, 0, 0], [5, 6, 7], [2], [6, 1, 2]]
    b = build_batch(prompts, completions, 2, [1, 2], lambda ids: ",".join(map(str, ids)))
    assert b.prompt_ids == [[10, 11], [10, 11], [12], [12]]
    assert b.response_ids == [[5, 2], [5, 6, 7], [2], [6, 1]]
    assert b.truncated == [False, True, False, False]
    assert b.texts == ["5,2", "5,6,7", "2", "6,1"]
    assert b.n == 2 and b.num_prompts == 2 and len(b) == 4
    assert b.response_lengths == [2, 3, 1, 2]
    with pytest.raises(ValueError, match="2 x 2"):
        build_batch(prompts, completions[:3], 2, [1], str)


def test_rollout_batch_checks_lengths():
    with pytest.raises(ValueError, match="different lengths"):
        RolloutBatch([[1]], [[1], [2]], [False], ["a"])
    with pytest.raises(ValueError, match="multiple of n"):
        RolloutBatch([[1]] * 3, [[1]] * 3, [False] * 3, ["a"] * 3, n=2)


def test_generation_eos_ids_int_or_list():
    tok = SimpleNamespace(eos_token_id=9)
    as_int = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=3), config=None)
    as_list = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[3, 4, 3]))
    none = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=None),
                           config=SimpleNamespace(eos_token_id=None))
    assert generation_eos_ids(as_int, tok) == [3]
    assert generation_eos_ids(as_list, tok) == [3, 4]
    assert generation_eos_ids(none, tok) == [9]
    with pytest.raises(ValueError, match="EOS"):
        generation_eos_ids(none, SimpleNamespace(eos_token_id=None))


def test_vllm_outputs_to_completions_plain_data():
    # The fields vLLM's RequestOutput / CompletionOutput carry (vllm/outputs.py).
    def completion(index, ids, reason):
        return SimpleNamespace(index=index, token_ids=ids, finish_reason=reason, text="")

    outputs = [
        SimpleNamespace(
            outputs=[completion(1, (7, 8, 9), "length"), completion(0, [4, 2], "stop")]
        ),
        SimpleNamespace(outputs=[completion(0, [2], "stop"), completion(1, [5, 1], "stop")]),
    ]
    comps, reasons = outputs_to_completions(outputs, 2)
    assert comps == [[4, 2], [7, 8, 9], [2], [5, 1]]
    assert reasons == ["stop", "length", "stop", "stop"]
    batch = build_batch([[1], [3]], comps, 2, [1, 2], str)
    assert batch.truncated == [False, True, False, False]
    with pytest.raises(RuntimeError, match="expected 3"):
        outputs_to_completions(outputs, 3)


def test_named_weights_for_vllm_dedups_tied_and_strips_wrappers():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(4, 3)
            self.head = torch.nn.Linear(3, 4, bias=False)
            self.head.weight = self.embed.weight  # tied
            self.norm = torch.nn.LayerNorm(3)

    wrapped = torch.nn.Module()
    wrapped._orig_mod = Tiny()
    names = [n for n, _ in named_weights_for_vllm(wrapped)]
    assert names == ["embed.weight", "norm.weight", "norm.bias"]
    tensors = dict(named_weights_for_vllm(wrapped))
    assert tensors["embed.weight"].data_ptr() == wrapped._orig_mod.embed.weight.data_ptr()
    assert not tensors["embed.weight"].requires_grad


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed here")
def test_missing_vllm_is_a_clear_error():
    with pytest.raises(ImportError, match=r"pip install -e \.\[vllm\]") as info:
        import_vllm()
    assert "CUDA GPU" in str(info.value)
    with pytest.raises(ImportError, match="vllm"):
        VLLMRollout(torch.nn.Linear(1, 1), None, max_new_tokens=4)
    with pytest.raises(ImportError, match="vllm"):
        make_rollout("vllm", torch.nn.Linear(1, 1), None, max_new_tokens=4)


def test_pinned_version_is_a_release():
    assert PINNED_VLLM_VERSION.count(".") == 2


def test_make_rollout_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown rollout 'sglang'"):
        make_rollout("sglang", None, None)
