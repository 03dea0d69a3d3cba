from pathlib import Path

import pytest

from sedir_utils.core.io import StageError
from sedir_utils.core.params import QuestionParams
from sedir_utils.engine.sampling import Generation
from sedir_utils.stages.questions.filters import FILTERS, filter_questions, question_prompt, template_markers
from sedir_utils.stages.questions.stage import synthesize_questions

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = "You are a helpful assistant.\nTry your best to answer the users reasoning question."

LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def test_chatml_prompt_is_system_then_an_open_user_turn(tokenizer):
    prompt = question_prompt(tokenizer, SYSTEM)
    assert prompt == f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"
    assert "<|im_start|>assistant" not in prompt


def test_prompt_follows_another_template(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = LLAMA3
    prompt = question_prompt(tok, SYSTEM)
    assert prompt.endswith(f"{SYSTEM}<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n")
    assert "assistant<|end_header_id|>" not in prompt


def test_a_template_that_drops_the_system_prompt_is_refused(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "{% for m in messages if m['role'] != 'system' %}<u>{{ m['content'] }}</u>{% endfor %}"
    with pytest.raises(ValueError, match="dropped the system prompt"):
        question_prompt(tok, SYSTEM)


def gen(text, finished=True):
    return Generation(text=text, num_tokens=len(text.split()), finished=finished)


def test_each_filter_drops_what_it_names():
    gens = [
        gen("   "),  # empty
        gen("What is the boiling point of water at sea level?", finished=False),  # truncated
        gen("Why?"),  # too_short
        gen("x" * 300),  # too_long
        gen("What is 2+2?<|im_start|>assistant\n4"),  # template_tokens
        gen("How many legs does a spider have?"),  # kept
        gen("how many legs   does a spider have?"),  # duplicate after normalising
        gen("Explain, step by step:\n1. why ice floats\n2. why it matters for lakes"),  # multi-line kept
    ]
    kept, dropped = filter_questions(gens, ["<|im_start|>", "<|im_end|>"], min_chars=10, max_chars=200)
    assert [i for i, _ in kept] == [5, 7]
    text_filters = ("empty", "truncated", "too_short", "too_long", "template_tokens", "duplicate")
    assert dropped == {name: int(name in text_filters) for name in FILTERS}


def test_questions_never_contain_template_markers(tokenizer):
    markers = template_markers(tokenizer)
    assert "<|im_start|>" in markers and "<|im_end|>" in markers


def fake_generate(texts):
    """A stand-in for generation that hands out the given texts in order, counting calls."""
    calls = []

    def generate_fn(model, tok, prompts, sampling, batch_size, seed, desc=""):
        calls.append((len(prompts), seed))
        return [gen(texts[(len(calls) - 1 + i) % len(texts)]) for i in range(len(prompts))]

    return generate_fn, calls


def test_over_generation_stops_at_the_target(tokenizer):
    texts = [f"What is {i} times {i + 1}, and why?" for i in range(100)]
    generate_fn, calls = fake_generate(texts)
    section = QuestionParams(num_questions=5, batch_size=4, min_chars=5)
    rows, stats = synthesize_questions(
        None, tokenizer, section, seed=3, iteration=1, model_name="m", generate_fn=generate_fn
    )
    assert len(rows) == 5 and stats["kept"] == 5
    assert stats["generated"] == stats["kept"] + sum(stats["dropped"].values()) + stats["surplus"]
    assert all(r["iteration"] == 1 and r["model"] == "m" and r["seed"] == 3 for r in rows)
    assert rows[0]["sampling"]["temperature"] == section.temperature
    assert len({r["id"] for r in rows}) == 5


def test_a_stage_with_no_survivors_names_the_filter(tokenizer):
    generate_fn, calls = fake_generate(["Hi?"])  # always too short
    section = QuestionParams(num_questions=3, batch_size=4, max_rounds=2, min_chars=10)
    with pytest.raises(StageError, match="'too_short' dropped"):
        synthesize_questions(None, tokenizer, section, seed=0, iteration=1, model_name="m", generate_fn=generate_fn)
    assert len(calls) == 2 and calls[0][1] != calls[1][1]  # each round samples with its own seed


# --- any chat template (templates written here, in the style of each family) ----------------------------

GEMMA = (  # no system role: the template raises on one
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
INST = (  # Llama-2 / Mistral style: the system text inside the first [INST]
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
    "{% set msgs = messages[1:] %}{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
    "{% for m in msgs %}{% if m['role'] == 'user' %}[INST] {% if loop.first and sys %}<<SYS>>\n{{ sys }}\n<</SYS>>\n\n"
    "{% endif %}{{ m['content'] }} [/INST]{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


def with_template(tokenizer, template):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


@pytest.mark.parametrize(
    "family,template,opening,assistant",
    [
        ("chatml", None, "<|im_start|>user\n", "<|im_start|>assistant"),
        ("llama3", LLAMA3, "<|start_header_id|>user<|end_header_id|>\n\n", "assistant<|end_header_id|>"),
        ("gemma", GEMMA, "<start_of_turn>user\n", "<start_of_turn>model"),
        ("inst", INST, "[INST] <<SYS>>\n", "[/INST]"),
    ],
)
def test_every_template_family_gives_an_open_user_turn(tokenizer, family, template, opening, assistant):
    tok = tokenizer if template is None else with_template(tokenizer, template)
    prompt = question_prompt(tok, SYSTEM)
    assert SYSTEM in prompt and opening in prompt and assistant not in prompt
    assert not prompt.rstrip().endswith(("<end_of_turn>", "<|eot_id|>", "<|im_end|>", "[/INST]"))
    if family == "gemma":  # no system role: the system text opens the user turn, where Gemma puts it
        assert prompt.endswith(f"<start_of_turn>user\n{SYSTEM}\n\n")
    if family == "inst":
        assert prompt.endswith(f"<<SYS>>\n{SYSTEM}\n<</SYS>>\n\n")


def test_a_template_that_rejects_a_user_turn_is_a_clear_error(tokenizer):
    tok = with_template(tokenizer, "{{ raise_exception('nothing works') }}")
    with pytest.raises(ValueError, match="rejects a plain user turn: nothing works"):
        question_prompt(tok, SYSTEM)


def test_generation_is_not_cut_at_a_newline(tokenizer):
    from sedir_utils.engine.sampling import end_of_turn_ids

    newline_ids = set(tokenizer("\n", add_special_tokens=False)["input_ids"])
    assert not newline_ids & set(end_of_turn_ids(tokenizer))


# --- the new text filters --------------------------------------------------------------------------------


def test_request_self_answer_and_language_filters():
    gens = [
        gen("The mitochondria is the powerhouse of the cell."),  # not_a_request
        gen("Explain why the moon has phases"),  # kept: a request without '?'
        gen("Which is larger:\nA) 2/3\nB) 3/5"),  # kept: a question word, options
        gen("What is 12 times 12?\nAnswer: 144"),  # self_answer
        gen("What is 12 times 13?\n\nSolution: 12 x 13 = 156"),  # self_answer
        gen("Что такое фотосинтез и зачем он нужен?"),  # script
        gen("¿Cuál es la capital de Francia y por qué?"),  # kept: Latin script
    ]
    kept, dropped = filter_questions(gens, [], min_chars=5, max_chars=500, script="latin")
    assert [i for i, _ in kept] == [1, 2, 6]
    assert (dropped["not_a_request"], dropped["self_answer"], dropped["script"]) == (1, 2, 1)
    kept, _ = filter_questions(gens, [], min_chars=5, max_chars=500, require_request=False, drop_self_answers=False)
    assert len(kept) == len(gens)  # each filter can be switched off


# --- steering --------------------------------------------------------------------------------------------


def test_steering_forms_and_presets():
    from sedir_utils.core.params import SteeringPrompt
    from sedir_utils.core.steering import PRESETS, steering_options

    assert [o.name for o in steering_options(SYSTEM)] == ["paper"]
    assert steering_options("preset:math")[0].prompt == PRESETS["math"]
    options = steering_options({"math": SteeringPrompt("preset:math", 3.0), "mine": "Ask about birds."})
    assert [(o.name, o.weight) for o in options] == [("math", 3.0), ("mine", 1.0)]
    assert [o.name for o in steering_options(["preset:code", "Ask riddles."])] == ["code", "prompt1"]
    with pytest.raises(ValueError, match="unknown preset 'chem'"):
        steering_options("preset:chem")


def test_steering_is_weighted_recorded_and_used(tokenizer):
    from sedir_utils.core.params import SteeringPrompt
    from sedir_utils.core.steering import assign_steering, steering_options

    options = steering_options(
        {"a": SteeringPrompt("Ask about math.", 3.0), "b": SteeringPrompt("Ask about art.", 1.0)}
    )
    picks = assign_steering(options, 4000, seed=1)
    assert picks == assign_steering(options, 4000, seed=1)
    assert 0.72 < picks.count(0) / 4000 < 0.78

    seen_prompts = []

    def generate_fn(model, tok, prompts, sampling, batch_size, seed, desc=""):
        seen_prompts.extend(prompts)
        return [gen(f"Question number {len(seen_prompts) + i}: why?") for i in range(len(prompts))]

    section = QuestionParams(
        num_questions=12, batch_size=4, system_prompt={"a": "Ask about math.", "b": "Ask about art."}
    )
    rows, stats = synthesize_questions(
        None, tokenizer, section, seed=0, iteration=1, model_name="m", generate_fn=generate_fn
    )
    assert {r["steering"] for r in rows} == {"a", "b"}
    for row in rows:
        assert row["system_prompt"] == {"a": "Ask about math.", "b": "Ask about art."}[row["steering"]]
    assert sum(stats["steering"].values()) == 12
    assert any("Ask about math." in p for p in seen_prompts) and any("Ask about art." in p for p in seen_prompts)


# --- near duplicates, history, decontamination, diversity ------------------------------------------------


class WordEmbedder:
    """A deterministic stand-in: normalised bag of words over a fixed vocabulary."""

    name = "words"

    def encode(self, texts):
        import re
        import zlib

        import numpy as np

        rows = []
        for text in texts:
            vec = np.zeros(512, dtype=np.float32)
            for w in re.findall(r"\w+", text.lower()):
                vec[zlib.crc32(w.encode()) % 512] += 1
            rows.append(vec / max(np.linalg.norm(vec), 1e-9))
        return np.stack(rows) if rows else np.zeros((0, 512), dtype=np.float32)


def test_screen_drops_near_duplicates_within_and_across_iterations():
    from sedir_utils.stages.questions.screen import Screen

    screen = Screen(WordEmbedder(), history=[("Why do cats purr when they are happy?", "iter_1")], near_threshold=0.9)
    reasons = screen.check(
        [
            "why do cats purr when they are happy?",  # an earlier iteration's question
            "How are rainbows formed after rain?",  # new
            "How are rainbows formed after the rain?",  # near duplicate of the one just kept
            "What is the tallest mountain on Earth?",  # new
        ]
    )
    assert reasons == ["near_duplicate", None, "near_duplicate", None]
    sources = [e["source"] for e in screen.examples["near_duplicate"]]
    assert sources == ["iter_1", "this iteration"]
    assert all(e["similarity"] >= 0.9 for e in screen.examples["near_duplicate"])


def test_decontamination_catches_a_question_planted_from_the_eval_file():
    from sedir_utils.run.params import load_params
    from sedir_utils.stages.questions.screen import Screen
    from sedir_utils.stages.questions.stage import eval_question_texts

    eval_texts = eval_question_texts(load_params(ROOT / "params" / "embedded.yaml"))
    assert len(eval_texts) == 24  # the packaged GPQA-format file
    planted = eval_texts[5]
    reworded = "Quick question: " + planted.lower()  # the eval question inside a longer one
    screen = Screen(None, eval_texts=eval_texts, ngram=8)
    assert screen.check([reworded, "What colour is a ripe banana, and why does it change colour?"]) == [
        "contaminated",
        None,
    ]
    example = screen.examples["contaminated"][0]
    assert example["nearest"] == planted and len(example["ngram"].split()) == 8


def test_decontamination_by_embedding_with_minilm(weights):
    from sedir_utils.engine.embeddings import MiniLM
    from sedir_utils.stages.questions.screen import Screen

    eval_texts = ["Which planet in the solar system has the largest number of confirmed moons?"]
    screen = Screen(MiniLM(), eval_texts=eval_texts, contamination_threshold=0.8, ngram=8)
    assert screen.check(
        ["Which planet of our solar system has the most confirmed moons?", "How do I bake sourdough bread at home?"]
    ) == ["contaminated", None]


def test_diversity_figures():
    import numpy as np

    from sedir_utils.stages.questions.screen import diversity

    same = diversity(["a b c", "a b c"], np.array([[1.0, 0.0], [1.0, 0.0]]))
    varied = diversity(["a b c", "d e f"], np.array([[1.0, 0.0], [0.0, 1.0]]))
    assert same["distinct_1"] == 0.5 and varied["distinct_1"] == 1.0
    assert same["distinct_2"] == 0.5 and varied["distinct_2"] == 1.0
    assert same["mean_pairwise_distance"] == 0.0 and varied["mean_pairwise_distance"] == 1.0
