"""Study specs with model roles: bases, fine-tunes from a file, per-model and per-experiment overrides."""

from __future__ import annotations

import textwrap

import pytest

from study.core.errors import UsageError
from study.spec import load_study


def _spec(tmp_path, text: str, name: str = "study.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_roles_file_and_overrides(tmp_path):
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "finetunes.txt").write_text("# one per line\norg/tune-a\n\norg/tune-b  # the second\n")
    spec = _spec(tmp_path, """
        models:
          - name: org/base
            role: base
          - file: lists/finetunes.txt
            base: org/base
            overrides: {system_prompt: null, format: paper}
          - name: org/chat
            base: org/base
            revision: abc123
            overrides: {limit: 3, asr: {limit: 5, max_new_tokens: 7}}
        defaults: {limit: 10, format: chat}
        ships: {limit: 4}
        asr: {heads: L0H1}
        swap: {heads: L0H1, recipes: [attn-from-base]}
    """)
    study = load_study(spec)
    jobs = list(study.jobs())
    by = {(name, cfg.model): cfg for name, cfg in jobs}
    models = ["org/base", "org/tune-a", "org/tune-b", "org/chat"]
    assert [m.name for m in study.models] == models
    assert [study.entry(m).base for m in models] == [None, "org/base", "org/base", "org/base"]
    # a section beats the defaults; a model's overrides beat the section; its section overrides beat both
    assert by[("ships", "org/base")].limit == 4
    assert by[("ships", "org/chat")].limit == 3
    assert by[("asr", "org/chat")].limit == 5 and by[("asr", "org/chat")].max_new_tokens == 7
    assert by[("asr", "org/base")].limit == 10
    assert by[("ships", "org/tune-a")].format.value == "paper"
    assert by[("ships", "org/chat")].format.value == "chat"
    assert by[("ships", "org/chat")].revision == "abc123"
    # swaps run for the fine-tunes only, each against its base
    swaps = [cfg for name, cfg in jobs if name == "swap"]
    assert [(c.model, c.base) for c in swaps] == [(m, "org/base") for m in models[1:]]


def test_plain_names_still_work_and_generalized_ships_is_one_step(tmp_path):
    spec = _spec(tmp_path, """
        models: [org/a, org/b]
        generalized_ships: {limit: 2, steps: 4}
        specificity: {limit: 2}
    """)
    jobs = list(load_study(spec).jobs())
    assert [(n, c.model) for n, c in jobs] == [("specificity", "org/a"), ("specificity", "org/b"),
                                               ("generalized_ships", "org/a"), ("generalized_ships", "org/b")]
    assert all(c.steps == 1 for n, c in jobs if n == "generalized_ships")
    assert all(c.prompts == "builtin:benign" for n, c in jobs if n == "specificity")


@pytest.mark.parametrize("body,needle", [
    ("models: [{name: org/a, overrides: {learning_rate: 1}}]\nships: {}", "unknown override 'learning_rate'"),
    ("models: [{name: org/a, overrides: {asr: {top: 3}}}]\nships: {}", "overrides.asr: unknown config key 'top'"),
    ("models: [{name: org/a, role: base, base: org/b}]\nships: {}", "has role base and a base"),
    ("models: [{name: org/a, role: teacher}]\nships: {}", "role"),
    ("models: [org/a, org/a]\nships: {}", "listed twice"),
    ("models: [org/a]\nswap: {heads: L0H1}", "no model names its base"),
    ("models: [{file: missing.txt}]\nships: {}", "missing.txt' not found"),
    ("models: [{name: org/a, base: org/b}]\nswap: {recipes: [attn-from-mlp]}", "unknown swap recipe 'attn-from-mlp'"),
    ("models: [{name: org/a, base: org/b}]\nswap: {backend: vllm}", "backend hf"),
    ("models: [org/a]\noverlap: {k: 0}\nships: {}", "overlap"),
])
def test_bad_specs_name_the_file_and_the_field(tmp_path, body, needle):
    spec = _spec(tmp_path, body)
    with pytest.raises(UsageError) as err:
        load_study(spec)
    msg = str(err.value)
    assert needle in msg
    assert str(spec) in msg and "\n" not in msg


def test_every_builtin_spec_validates():
    from study.spec import packaged_configs

    names = sorted(p.stem for p in packaged_configs().glob("*.yaml"))
    assert {"paper", "quickstart", "searches"} <= set(names)
    for name in names:
        assert list(load_study(name).jobs()), name


def test_the_searches_spec_compares_three_groups_per_member_on_the_same_prompts():
    study = load_study("searches")
    jobs = list(study.jobs())
    asr = [c for name, c in jobs if name == "asr"]
    assert len(asr) == 4 and all(c.groups == ["ships", "sahara", "joint"] and c.k == 5 for c in asr)
    joint = [c for name, c in jobs if name == "joint"]
    assert all(c.k == 5 and c.seeds == [0, 1] and c.prompts == "builtin:harmful" for c in joint)
    assert {c.prompts for _, c in jobs} == {"builtin:harmful"}


def test_the_paper_spec_states_its_setting_and_numbers():
    study = load_study("paper")
    chat, vicuna, base = "meta-llama/Llama-2-7b-chat-hf", "lmsys/vicuna-7b-v1.5", "meta-llama/Llama-2-7b-hf"
    assert study.entry(chat).base == base and study.entry(vicuna).base == base and study.entry(base).role == "base"
    jobs = list(study.jobs())
    assert all(cfg.model != base for _, cfg in jobs)  # the base is measured through the swaps only
    gships = {(c.model, c.prompts, c.op.value) for n, c in jobs if n == "generalized_ships"}
    assert len(gships) == 2 * 3 * 2  # models x datasets x operators (Fig. 5)
    assert {c.steps for n, c in jobs if n == "sahara"} == {5}
    assert {c.decoding for n, c in jobs if n == "asr"} == {"greedy", "topk"}
    assert {c.format.value for _, c in jobs} == {"paper"}
    numbers = {(p.model, p.metric, p.dataset): p for p in study.published}
    assert numbers[(chat, "asr", "advbench")].baseline == 0.04 and numbers[(chat, "asr", "advbench")].value == 0.64
    assert numbers[(vicuna, "asr", "advbench")].value == 0.55
    assert numbers[(chat, "delta_asr", "maliciousinstruct")].value == [0.63, 0.68, 0.72, 0.70, 0.66]
    assert numbers[(chat, "top_head", None)].value == "L2H26"


def test_benign_sections_keep_their_own_prompts(tmp_path):
    spec = _spec(tmp_path, """
        models: [org/a]
        defaults: {prompts: builtin:harmful, limit: 5}
        specificity: {}
        utility: {heads: L0H1}
    """)
    jobs = dict(load_study(spec).jobs())
    assert jobs["specificity"].prompts == "builtin:benign" and jobs["utility"].prompts == "builtin:text"
    assert jobs["specificity"].limit is None and jobs["utility"].format.value == "direct"


def test_surgery_keeps_its_own_eps_unless_its_section_sets_one(tmp_path):
    """The defaults' eps is the scoring one (1e-5); a saved checkpoint is ablated at the paper's 1e-10."""
    spec = _spec(tmp_path, """
        models: [org/a]
        defaults: {eps: 1.0e-5}
        ships: {}
        surgery: {heads: L0H1}
    """)
    jobs = dict(load_study(spec).jobs())
    assert jobs["ships"].eps == 1e-5 and jobs["surgery"].eps == 1e-10
    spec = _spec(tmp_path, """
        models: [org/a]
        defaults: {eps: 1.0e-5}
        surgery: {heads: L0H1, eps: 1.0e-3}
    """, name="s2.yaml")
    assert dict(load_study(spec).jobs())["surgery"].eps == 1e-3
