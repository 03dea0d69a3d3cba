from sedir_utils.core.models import load_tokenizer
from sedir_utils.engine.generation import generate
from sedir_utils.engine.sampling import SamplingParams, end_of_turn_ids


def chat(tokenizer, text):
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )


def test_end_of_turn_is_a_stop_token(tokenizer, model_fp32):
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in end_of_turn_ids(tokenizer, model_fp32)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.padding_side == "left"


def test_batched_greedy_matches_one_at_a_time(tokenizer, model_fp32):
    prompts = [
        chat(tokenizer, "Say hello."),
        chat(tokenizer, "Name three colours of the rainbow, then explain in one sentence why rainbows form."),
    ]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=24)
    batched = generate(model_fp32, tokenizer, prompts, greedy, batch_size=2, seed=0)
    alone = [generate(model_fp32, tokenizer, [p], greedy, batch_size=1, seed=0)[0] for p in prompts]
    assert [g.text for g in batched] == [g.text for g in alone]
    for g in batched:
        assert "<|im_end|>" not in g.text and "<|im_start|>" not in g.text


def test_generation_stops_at_end_of_turn(tokenizer, model_fp32):
    out = generate(
        model_fp32,
        tokenizer,
        [chat(tokenizer, "Say hello.")],
        SamplingParams(temperature=0.0, max_new_tokens=64),
        batch_size=1,
        seed=0,
    )[0]
    assert out.finished and 0 < out.num_tokens < 64


def test_same_seed_same_samples(tokenizer, model_fp32):
    prompts = [chat(tokenizer, "Write a riddle.")] * 3
    sampling = SamplingParams(temperature=1.0, max_new_tokens=16)
    a = generate(model_fp32, tokenizer, prompts, sampling, batch_size=3, seed=11)
    b = generate(model_fp32, tokenizer, prompts, sampling, batch_size=3, seed=11)
    c = generate(model_fp32, tokenizer, prompts, sampling, batch_size=3, seed=12)
    assert [g.text for g in a] == [g.text for g in b]
    assert [g.text for g in a] != [g.text for g in c]


def test_tokenizer_padding_side_does_not_matter(embedded_path, tokenizer, model_fp32):
    # The engine pads prompts on the left itself; a tokenizer loaded for training (right) gives the same.
    right = load_tokenizer(embedded_path, padding_side="right")
    prompts = [chat(tokenizer, "Say hello."), chat(tokenizer, "Count from one to five, in words.")]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12)
    assert [g.text for g in generate(model_fp32, right, prompts, greedy, 2, 0)] == [
        g.text for g in generate(model_fp32, tokenizer, prompts, greedy, 2, 0)
    ]
