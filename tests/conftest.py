import pytest

from sedir_utils.models import load_tokenizer, resolve_model


@pytest.fixture(scope="session")
def embedded_path() -> str:
    """The embedded SmolLM2-135M-Instruct, converted once into the cache (~20 s the first time)."""
    return resolve_model("embedded")


@pytest.fixture(scope="session")
def tokenizer(embedded_path):
    return load_tokenizer(embedded_path)


@pytest.fixture(scope="session")
def model_fp32(embedded_path):
    from sedir_utils.models import load_causal_lm

    return load_causal_lm(embedded_path, "float32", "cpu")
