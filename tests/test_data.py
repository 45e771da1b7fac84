"""Data loading (JSONL, datasets directories) and its error messages; prompt encoding."""

import json

import pytest
from _tiny_lm import make_tokenizer

from g2rl.data import Example, encode_prompt, load_examples


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_round_trip_and_limit(tmp_path):
    rows = [{"prompt": f"q{i}", "answer": i, "extra": "x"} for i in range(5)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    ex = load_examples(str(path))
    assert ex == [Example(f"q{i}", str(i)) for i in range(5)]
    assert load_examples(str(path), limit=2) == ex[:2]


def test_jsonl_custom_fields_and_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"problem": "p", "solution": "s"}\n\n{"problem": "q", "solution": "t"}\n')
    ex = load_examples(str(path), prompt_field="problem", answer_field="solution")
    assert ex == [Example("p", "s"), Example("q", "t")]


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": \n')
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2: malformed JSON"):
        load_examples(str(path))


def test_missing_field_names_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b"}])
    with pytest.raises(KeyError, match=r"f\.jsonl, line 2: missing field 'answer'"):
        load_examples(str(path))


def test_non_object_line(tmp_path):
    path = tmp_path / "l.jsonl"
    path.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="line 1: expected a JSON object"):
        load_examples(str(path))


def test_missing_path(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_examples(str(missing))
    with pytest.raises(FileNotFoundError, match="no/such/dir"):
        load_examples("./no/such/dir")


def test_hub_name_without_network_is_a_clear_error(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FileNotFoundError, match="nobody/nothing.*hub"):
        load_examples("nobody/nothing")


def test_load_from_disk_round_trip(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"prompt": ["a", "b", "c"], "answer": ["1", "2", "3"]})
    ds.save_to_disk(str(tmp_path / "single"))
    assert load_examples(str(tmp_path / "single")) == [
        Example("a", "1"), Example("b", "2"), Example("c", "3")
    ]
    assert len(load_examples(str(tmp_path / "single"), limit=2)) == 2

    dd = datasets.DatasetDict({"train": ds, "test": ds.select([0])})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert load_examples(str(tmp_path / "dict"), split="test") == [Example("a", "1")]
    with pytest.raises(ValueError, match="splits"):
        load_examples(str(tmp_path / "dict"))
    with pytest.raises(ValueError, match="no split 'val'"):
        load_examples(str(tmp_path / "dict"), split="val")
    with pytest.raises(KeyError, match="missing field 'question'"):
        load_examples(str(tmp_path / "single"), prompt_field="question")


def test_directory_that_is_not_a_dataset(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(FileNotFoundError, match="save_to_disk"):
        load_examples(str(tmp_path))


def test_encode_prompt_with_and_without_chat_template():
    tok = make_tokenizer(chat_template=True)
    ids = encode_prompt(tok, "1+1?", "Be brief.")
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert text.endswith("<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n")
    assert all(isinstance(i, int) for i in ids)
    assert "system" not in tok.decode(encode_prompt(tok, "q", None))

    plain = make_tokenizer(chat_template=False)
    assert plain.decode(encode_prompt(plain, "q", "sys")) == "sys\n\nq"
    assert plain.decode(encode_prompt(plain, "q", None)) == "q"


def test_json_array_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"prompt": "a", "answer": 1}, {"prompt": "b", "answer": 2}]))
    assert load_examples(str(path)) == [Example("a", "1"), Example("b", "2")]
    assert load_examples(str(path), limit=1) == [Example("a", "1")]
    path.write_text('[{"prompt": "a", "answer": 1},\n {"prompt": ]')
    with pytest.raises(ValueError, match="line 2: malformed JSON"):
        load_examples(str(path))
    path.write_text('[{"prompt": "a"}]')
    with pytest.raises(KeyError, match="item 0: missing field 'answer'"):
        load_examples(str(path))
