"""evaluate() metrics on scripted samples, and the eval CLI on a tiny saved checkpoint."""

import json

import pytest
from _tiny_lm import make_model, make_tokenizer

from g2rl.data import Example
from g2rl.eval import evaluate, main
from g2rl.rollout import RolloutBatch


class ScriptedRollout:
    """Returns fixed completions per prompt text (a stand-in for the engine's sampling)."""

    def __init__(self, tok, script):
        self.tok, self.script = tok, script
        self.calls = []

    def generate(self, prompts, n, *, seed=None):
        self.calls.append((len(prompts), n, seed))
        texts = [t for p in prompts for t in self.script[self.tok.decode(p)][:n]]
        ids = [self.tok.encode(t) for t in texts]
        return RolloutBatch([p for p in prompts for _ in range(n)], ids, [False] * len(ids),
                            texts, n=n)


def test_evaluate_metrics_by_hand():
    tok = make_tokenizer(chat_template=False)
    script = {
        "a": ["1", "2", "2", "3"],   # gold 1: one correct, majority "2" is wrong
        "b": ["5", "5", "x", "6"],   # gold 5: two correct, majority "5" is right
        "c": ["x", "x", "x", "x"],   # gold 9: nothing correct, no answers at all
    }
    examples = [Example("a", "1"), Example("b", "5"), Example("c", "9")]

    def reward(text, gold):
        return 1.0 if text == gold else -1.0

    def answer(text):
        return None if text == "x" else text

    roll = ScriptedRollout(tok, script)
    res = evaluate(None, tok, examples, reward_fn=reward, answer_fn=answer, n=4, ks=(1, 2, 4),
                   rollout=roll, batch_size=8, progress=False, return_samples=True)
    assert res["n_prompts"] == 3 and res["n_samples"] == 12 and res["n"] == 4
    assert res["pass@1"] == pytest.approx((1 / 4 + 2 / 4 + 0) / 3)
    # pass@2: 1 - C(3,2)/C(4,2) = 1/2 ; 1 - C(2,2)/C(4,2) = 5/6 ; 0
    assert res["pass@2"] == pytest.approx((1 / 2 + 5 / 6 + 0) / 3)
    assert res["pass@4"] == pytest.approx(2 / 3)
    assert res["maj@4"] == pytest.approx(1 / 3)   # a: "2" wins (wrong); b: "5" (right); c: none
    assert res["maj@1"] == pytest.approx(2 / 3)   # first samples: "1" right, "5" right, none
    assert res["mean_reward"] == pytest.approx((3 * 1 - 9) / 12)
    assert res["truncated_frac"] == 0.0
    assert len(res["samples"]) == 12 and res["samples"][0]["completion"] == "1"
    assert [c[0] for c in roll.calls] == [2, 1]  # batch_size 8 / n 4 = 2 prompts per call
    with pytest.raises(ValueError, match="k must be"):
        evaluate(None, tok, examples, reward_fn=reward, answer_fn=answer, n=2, ks=(4,),
                 rollout=roll, progress=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    tok = make_tokenizer(chat_template=True)
    make_model(len(tok), seed=1).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_eval_cli_on_jsonl(checkpoint, tmp_path, capsys):
    data = tmp_path / "math.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=?", "answer": str(i + 1)}) + "\n"
                            for i in range(3)))
    out = tmp_path / "res" / "results.json"
    res = main(["--checkpoint", str(checkpoint), "--data", str(data), "--n", "4", "--k", "1", "2",
                "--max-new-tokens", "6", "--output", str(out), "--no-progress"])
    saved = json.loads(out.read_text())
    assert saved["n_prompts"] == 3 and saved["n_samples"] == 12
    for key in ("pass@1", "pass@2", "maj@1", "maj@2"):
        assert 0.0 <= saved[key] <= 1.0 and saved[key] == res[key]
    assert saved["config"]["reward"] == "math"
    assert saved["config"]["system_prompt"].startswith("Please reason step by step")
    assert json.loads(capsys.readouterr().out)["n_samples"] == 12


def test_eval_cli_builtin(checkpoint):
    res = main(["--checkpoint", str(checkpoint), "--data", "builtin", "--limit", "3", "--n", "2",
                "--max-new-tokens", "4", "--no-progress"])
    assert res["n_prompts"] == 3 and res["n_samples"] == 6
    assert {"pass@1", "pass@2", "maj@2"} <= set(res)
    assert res["config"]["reward"] == "builtin" and res["config"]["system_prompt"] is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--checkpoint", "{tmp}/missing", "--data", "builtin"], "directory not found"),
        (["--checkpoint", "{tmp}", "--data", "builtin"], "no config.json"),
        (["--checkpoint", "{ckpt}", "--data", "{tmp}/nope.jsonl"], "nope.jsonl"),
        (["--checkpoint", "{ckpt}", "--data", "{tmp}/bad.jsonl"], "line 2: malformed JSON"),
        (["--checkpoint", "{ckpt}", "--data", "{tmp}/bad.jsonl", "--n", "0"], "--n must be"),
        (["--checkpoint", "{ckpt}", "--data", "builtin", "--n", "2", "--k", "4"], "--k values"),
        (["--checkpoint", "{ckpt}", "--data", "{tmp}/nofield.jsonl"], "missing field 'answer'"),
    ],
)
def test_eval_cli_errors(checkpoint, tmp_path, capsys, argv, message):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "answer": "1"}\nnot json\n')
    (tmp_path / "nofield.jsonl").write_text('{"prompt": "a"}\n')
    argv = [a.format(tmp=tmp_path, ckpt=checkpoint) for a in argv]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err
