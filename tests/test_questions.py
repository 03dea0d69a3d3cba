import pytest

from sedir_utils.config import QuestionParams
from sedir_utils.generation import Generation
from sedir_utils.io import StageError
from sedir_utils.questions import FILTERS, filter_questions, question_prompt, synthesize_questions, template_markers

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
        gen("   "),                                         # empty
        gen("What is the boiling point of water at sea level?", finished=False),  # truncated
        gen("Why?"),                                        # too_short
        gen("x" * 300),                                     # too_long
        gen("What is 2+2?<|im_start|>assistant\n4"),        # template_tokens
        gen("How many legs does a spider have?"),           # kept
        gen("how many legs   does a spider have?"),         # duplicate after normalising
        gen("Explain, step by step:\n1. why ice floats\n2. why it matters for lakes"),  # multi-line kept
    ]
    kept, dropped = filter_questions(gens, ["<|im_start|>", "<|im_end|>"], min_chars=10, max_chars=200)
    assert [i for i, _ in kept] == [5, 7]
    assert dropped == {name: 1 for name in FILTERS}


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
    rows, stats = synthesize_questions(None, tokenizer, section, seed=3, iteration=1, model_name="m",
                                       generate_fn=generate_fn)
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
