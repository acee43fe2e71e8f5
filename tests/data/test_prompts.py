import os

os.environ["HF_HUB_OFFLINE"] = "1"


import pytest

from fv_remote.data import (
    ICLPrompt,
    PromptTemplate,
    answer_first_token,
    build_prompts,
    resolve_answers,
    split_pairs,
)
from fv_remote.core.errors import UserError

PAIRS = [(f"in{i}", f"out{i}") for i in range(30)]


# --- template -----------------------------------------------------------------------------------------------


def test_template_todd_format():
    t = PromptTemplate()
    assert t.query_text("hot") == "Q: hot\nA:"
    assert t.demo("hot", "cold") == "Q: hot\nA: cold"
    assert t.render([("hot", "cold"), ("up", "down")], "big") == "Q: hot\nA: cold\n\nQ: up\nA: down\n\nQ: big\nA:"
    assert t.render([], "big") == "Q: big\nA:"


def test_template_custom_and_braces():
    t = PromptTemplate(query="{x} ->", answer=" {y}", separator="\n", prefix="Opposites:\n")
    assert t.render([("a{b}", "c")], "d") == "Opposites:\na{b} -> c\nd ->"


# --- splits -------------------------------------------------------------------------------------------------


def test_split_pairs_sizes_and_disjoint():
    s = split_pairs(PAIRS, seed=3)
    assert (len(s.train), len(s.valid), len(s.test)) == (22, 4, 4)
    assert sorted(s.train + s.valid + s.test) == sorted(PAIRS)


def test_split_pairs_deterministic():
    assert split_pairs(PAIRS, seed=1) == split_pairs(PAIRS, seed=1)
    assert split_pairs(PAIRS, seed=1).train != split_pairs(PAIRS, seed=2).train
    # Pinned: random.Random(seed).shuffle is stable across Python 3 versions, so is this split.
    assert split_pairs([(str(i), str(i)) for i in range(10)], seed=0, fractions=(0.6, 0.2, 0.2)).test == [
        ("9", "9"),
        ("6", "6"),
    ]


def test_split_pairs_bad_fractions():
    with pytest.raises(UserError, match="summing to 1"):
        split_pairs(PAIRS, fractions=(0.5, 0.2, 0.2))


# --- prompts ------------------------------------------------------------------------------------------------


def test_build_clean_prompts():
    prompts = build_prompts(PAIRS, 5, n_shots=4, seed=0)
    assert len(prompts) == 5
    lookup = dict(PAIRS)
    for p in prompts:
        assert isinstance(p, ICLPrompt) and p.kind == "clean"
        assert len(p.demos) == 4 and len(set(p.demos)) == 4
        assert all(lookup[x] == y for x, y in p.demos)
        assert p.query not in [x for x, _ in p.demos]
        assert p.answer == lookup[p.query]
        assert p.text == PromptTemplate().render(p.demos, p.query)
        assert p.text.endswith(f"Q: {p.query}\nA:")
    assert len({p.query for p in prompts}) == 5  # queries drawn without replacement


def test_build_prompts_reproducible():
    assert build_prompts(PAIRS, 8, n_shots=3, seed=7) == build_prompts(PAIRS, 8, n_shots=3, seed=7)
    assert build_prompts(PAIRS, 8, n_shots=3, seed=7) != build_prompts(PAIRS, 8, n_shots=3, seed=8)


def test_shuffled_are_clean_with_permuted_labels():
    clean = build_prompts(PAIRS, 20, n_shots=3, kind="clean", seed=5)
    shuffled = build_prompts(PAIRS, 20, n_shots=3, kind="shuffled", seed=5)
    lookup = dict(PAIRS)
    for c, s in zip(clean, shuffled):
        assert s.kind == "shuffled"
        assert (s.query, s.answer) == (c.query, c.answer)
        assert [x for x, _ in s.demos] == [x for x, _ in c.demos]
        assert sorted(y for _, y in s.demos) == sorted(y for _, y in c.demos)
        assert any(lookup[x] != y for x, y in s.demos)  # never the identity permutation
        assert s.text == PromptTemplate().render(s.demos, s.query)


def test_zero_shot_shares_queries():
    clean = build_prompts(PAIRS, 6, n_shots=5, seed=2)
    zero = build_prompts(PAIRS, 6, kind="zero_shot", seed=2)
    assert [p.query for p in zero] == [p.query for p in clean]
    assert all(p.demos == [] and p.text == f"Q: {p.query}\nA:" for p in zero)


def test_query_pairs_and_reuse():
    train, test = PAIRS[:20], PAIRS[20:]
    prompts = build_prompts(train, 25, n_shots=5, query_pairs=test, seed=0)
    assert {p.query for p in prompts} == {x for x, _ in test}  # 10 queries, all used, then reused
    assert all(d in train for p in prompts for d in p.demos)


def test_demos_never_share_query_input():
    pairs = [("a", "1"), ("a", "2"), ("b", "3"), ("c", "4")]
    for p in build_prompts(pairs, 8, n_shots=2, seed=0):
        assert p.query not in [x for x, _ in p.demos]


def test_build_prompts_validation():
    with pytest.raises(UserError, match="n_prompts"):
        build_prompts(PAIRS, 0)
    with pytest.raises(UserError, match="n_shots"):
        build_prompts(PAIRS, 1, n_shots=-1)
    with pytest.raises(UserError, match="there are 5"):
        build_prompts(PAIRS[:5], 1, n_shots=5)
    with pytest.raises(UserError, match="did you mean 'shuffled'"):
        build_prompts(PAIRS, 1, kind="shufled")
    assert len(build_prompts(PAIRS[:5], 1, n_shots=4)[0].demos) == 4


# --- answer tokens ------------------------------------------------------------------------------------------

SENTENCES = ["Q: hot\nA: cold", "Q: up\nA: down", "the cold day and the hot night", "up and down"] * 20


def _tiny_tokenizer(byte_level: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if byte_level:  # GPT-2 style: the space is folded into the following word ("Ġcold")
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        )
    else:  # SentencePiece style: "▁cold"
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=200, show_progress=False)
    tok.train_from_iterator(SENTENCES, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def byte_tok():
    return _tiny_tokenizer(byte_level=True)


def test_answer_first_token_byte_level(byte_tok):
    token = answer_first_token(byte_tok, "cold")
    assert byte_tok.decode([token]) == " cold"
    assert token != byte_tok.encode("cold", add_special_tokens=False)[0]  # encoding alone loses the space
    assert byte_tok.decode([answer_first_token(byte_tok, "down")]) == " down"


def test_answer_first_token_whitespace_is_unusable(byte_tok):
    # "  cold": the pre-tokenizer splits off a lone space, which says nothing about the answer.
    assert answer_first_token(byte_tok, "cold", PromptTemplate(answer="  {y}")) is None


def test_answer_first_token_metaspace():
    tok = _tiny_tokenizer(byte_level=False)
    token = answer_first_token(tok, "cold")
    assert tok.convert_ids_to_tokens([token]) == ["\u2581cold"]


def test_resolve_answers_reports_drops(byte_tok):
    pairs = [("hot", "cold"), ("x", " "), ("up", "down")]
    kept, ids, problems = resolve_answers(byte_tok, pairs, PromptTemplate())
    assert kept == [("hot", "cold"), ("up", "down")]
    assert [byte_tok.decode([i]) for i in ids] == [" cold", " down"]
    assert len(problems) == 1 and problems[0][0] == ("x", " ") and "whitespace" in problems[0][1]


@pytest.mark.integration
def test_answer_first_token_smollm2():
    from transformers import AutoTokenizer

    from fv_remote.models.loading import is_cached, model_dir

    if not is_cached("smollm2-135m"):  # `make test` pulls it first; a bare `pytest` run may not have it
        pytest.skip("smollm2-135m not pulled (fv-remote models pull smollm2-135m)")
    tok = AutoTokenizer.from_pretrained(str(model_dir("smollm2-135m")))
    assert tok.decode([answer_first_token(tok, "cold")]) == " cold"
    assert tok.decode([answer_first_token(tok, "Paris")]) == " Paris"
