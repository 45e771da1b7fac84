"""Configuration: defaults, YAML + flag precedence, clear errors naming the option."""

import pytest

from g2rl.config import ConfigError, TrainConfig, build_parser, parse_config


def test_defaults_are_valid():
    cfg = parse_config([])
    assert cfg == TrainConfig().validate()
    assert cfg.method == "g2rl" and cfg.data == "builtin" and cfg.model == "tiny"
    assert cfg.resolved_reward() == "builtin"
    assert cfg.resolved_sft_steps() > 0


def test_help_lists_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    for name in TrainConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in out
    assert "(default: g2rl)" in out and "(default: 0.001)" in out


def test_yaml_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: grpo\ngroup-size: 4\nlr: 1.0e-5\nprogress: false\n")
    cfg = parse_config(["--config", str(path), "--group-size", "6"])
    assert cfg.method == "grpo"  # from the file
    assert cfg.group_size == 6  # the flag wins
    assert cfg.lr == 1e-5 and cfg.progress is False
    assert cfg.steps == TrainConfig().steps  # default


@pytest.mark.parametrize("yaml_text, match", [
    ("bogus: 1\n", "unknown option 'bogus'"),
    ("lr: fast\n", "option 'lr' must be float"),
    ("progress: 3\n", "option 'progress' must be true or false"),
    ("- 1\n- 2\n", "expected a mapping"),
    ("steps: [1\n", "not valid YAML"),
])
def test_bad_yaml(tmp_path, yaml_text, match):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=match) as err:
        parse_config(["--config", str(path)])
    assert str(path) in str(err.value)


def test_missing_yaml(tmp_path):
    with pytest.raises(ConfigError, match="--config: file not found"):
        parse_config(["--config", str(tmp_path / "nope.yaml")])


@pytest.mark.parametrize("argv, match", [
    (["--group-size", "1"], "--group-size must be >= 2 with --method g2rl"),
    (["--group-size", "1", "--method", "grpo"], "--group-size must be >= 2 with --method grpo"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--eps-low", "1.5"], "--eps-low must be < 1"),
    (["--top-p", "0"], "--top-p must be in"),
    (["--novelty-lambda", "2"], "--novelty-lambda must be in"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--novelty-span-floor", "-0.1"], "--novelty-span-floor must be >= 0"),
    (["--novelty-std-floor", "-1"], "--novelty-std-floor must be >= 0"),
    (["--embedding-model", "/no/such/dir"], "--embedding-model directory not found"),
    (["--collapse-window", "0"], "--collapse-window must be >= 1"),
    (["--semantic-every", "0"], "--semantic-every must be >= 1"),
    (["--reward-timeout", "0"], "--reward-timeout must be > 0"),
    (["--reward-workers", "-1"], "--reward-workers must be >= 0"),
    (["--kl-coef", "-1"], "--kl-coef must be >= 0"),
    (["--eval-ks", "1,x"], "--eval-ks must be comma-separated integers"),
    (["--model", "/no/such/model"], "--model model directory not found"),
    (["--reward", "builtin", "--data", "x.jsonl", "--model", "."], "--reward builtin needs"),
    (["--data", "x.jsonl"], "--model the tiny model only knows"),
])
def test_bad_values_name_the_option(argv, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(argv)


def test_unknown_flag_and_bad_type_exit(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--no-such-flag"])
    with pytest.raises(SystemExit):
        parse_config(["--lr", "fast"])
    assert "--lr" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(["--method", "ppo"])


def test_main_reports_config_errors(capsys):
    from g2rl.train import main

    assert main(["--group-size", "1"]) == 2
    err = capsys.readouterr().err
    assert "--group-size must be >= 2 with --method g2rl" in err
