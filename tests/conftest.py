"""Fixtures, and the two tiers of tests.

A test is in the slow tier when it uses a fixture of ``SLOW_FIXTURES``: one that gives it a model (the embedded
model, the tiny random ones), or declares what it does: ``weights`` (it loads weights it finds itself) or
``processes`` (it starts processes). Every other test is fast (``make test-fast``), and there loading weights
or starting a process fails the test with a message naming the fixture to declare, so a slow test cannot land in
the fast tier unnoticed. ``make test`` runs both tiers.
"""

import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from sedir_utils.core.models import load_tokenizer, resolve_model

# A copy of the embedded model's tokenizer as the suite converts it (no weights): tests that need only a tokenizer.
TOKENIZER = Path(__file__).resolve().parent / "fixtures" / "tokenizer"
# The converted embedded model's config.json: with the tokenizer, a model folder without weights.
EMBEDDED_CONFIG = TOKENIZER.parent / "embedded_config.json"
SLOW_FIXTURES = {
    *("embedded_path", "model_fp32", "tiny_policy", "tiny_random", "tiny_reward_model", "weights", "processes")
}


def pytest_configure(config):
    """Under pytest-xdist (``make test`` runs two workers), each worker gets cores of its own: its affinity, which
    its torch threads, its papermill kernels, vLLM engines and worker processes inherit. Two workers sharing both
    cores would slow each other ~10x (OpenMP threads spinning for the same cores)."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker and hasattr(os, "sched_setaffinity"):
        own = worker_cores(sorted(os.sched_getaffinity(0)), int(worker.removeprefix("gw")), count)
        os.sched_setaffinity(0, own)
        torch.set_num_threads(len(own))


def worker_cores(cores: list[int], worker: int, count: int) -> list[int]:
    """Worker ``worker`` of ``count``'s share of ``cores`` (every count-th one); all of them where there are fewer
    cores than workers (then the workers share, slowly)."""
    return cores[worker % count :: count] if len(cores) >= count else cores


def pytest_sessionstart(session):
    """Machine-level caches a first test would otherwise build inside the fast tier's guard: matplotlib runs
    fc-list to build its font cache on a machine's first import."""
    import matplotlib.font_manager  # noqa: F401


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(item.fixturenames) or item.get_closest_marker("gpu"):
            item.add_marker(pytest.mark.slow)


class SlowTierOnly(BaseException):
    """Raised by what the fast tier forbids (a BaseException, so that no ``except Exception`` hides it)."""


@contextmanager
def _fast_tier(nodeid: str):
    """Loading model weights or starting a process fails the test, and says which fixture to declare."""
    from multiprocessing.process import BaseProcess

    from transformers import PreTrainedModel

    def refuse(what: str, fixture: str):
        def refused(*args, **kwargs):
            raise SlowTierOnly(f"{nodeid}: {what} in the fast tier; use the `{fixture}` fixture")

        return refused

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess.Popen, "__init__", refuse("starts a process", "processes"))
        patch.setattr(BaseProcess, "start", refuse("starts a process", "processes"))
        for name in ("system", "fork", "forkpty", "posix_spawn", "posix_spawnp"):
            patch.setattr(os, name, refuse("starts a process", "processes"))
        patch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse("loads model weights", "weights")))
        yield


def _guarded(item):
    if item.get_closest_marker("slow"):
        return (yield)
    with _fast_tier(item.nodeid):
        return (yield)


# Around a fast test's setup (its module's and session's fixtures included, set up there) and its call.
@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _guarded(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _guarded(item))


@pytest.fixture(scope="session")
def weights():
    """Declares that the test loads model weights no other fixture gives it (MiniLM, a model it builds)."""


@pytest.fixture(scope="session")
def processes():
    """Declares that the test (or a fixture of it) starts processes: papermill kernels, workers, the runner, the
    C compiler that builds the decode-attention kernel where its build is not cached yet."""


@pytest.fixture(scope="session")
def embedded_path() -> str:
    """The embedded SmolLM2-135M-Instruct, converted once into the cache (~20 s the first time)."""
    return resolve_model("embedded")


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded model's tokenizer, from the committed copy (``tests/fixtures/tokenizer``)."""
    return load_tokenizer(str(TOKENIZER))


@pytest.fixture(scope="session")
def weightless_model(tmp_path_factory) -> str:
    """The embedded model's folder without its weights (config and tokenizer): for fast tests of code that names a
    model (a stage's policy, a start label) and never loads it. Loading it fails: it has no weights."""
    folder = tmp_path_factory.mktemp("weightless_model")
    shutil.copytree(TOKENIZER, folder, dirs_exist_ok=True)
    shutil.copy(EMBEDDED_CONFIG, folder / "config.json")
    return str(folder)


@pytest.fixture(scope="session")
def model_fp32(embedded_path):
    from sedir_utils.core.models import load_causal_lm

    return load_causal_lm(embedded_path, "float32", "cpu")


@pytest.fixture
def on_gpu(monkeypatch):
    """Pose a CUDA device of a given compute capability (no CUDA call is made)."""
    from sedir_utils.core import models

    def pose(capability):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(models, "pick_device", lambda: "cuda")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(models, "_SAID", set())

    return pose


# CPU feature sets as torch.cpu.get_capabilities() reports them: an Intel server chip with AVX512-BF16, an AMD
# (before Zen 4) or consumer chip with AVX2 only, whatever this machine is.
AVX512_BF16 = {"architecture": "x86_64", "avx2": True, "avx512_f": True, "avx512_bf16": True, "amx_bf16": False}
AVX2_ONLY = {"architecture": "x86_64", "avx2": True, "avx512_f": False, "avx512_bf16": False, "amx_bf16": False}


@pytest.fixture
def on_cpu(monkeypatch):
    """Pose a CPU with the given features (``AVX512_BF16``, ``AVX2_ONLY``), no GPU."""
    from sedir_utils.core import models

    def pose(features):
        monkeypatch.setattr(models, "cpu_capabilities", lambda: dict(features))
        monkeypatch.setattr(models, "pick_device", lambda: "cpu")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(models, "_SAID", set())

    return pose


# Tiny random Qwen2 models with the embedded model's tokenizer: the GPU smoke suite's, and the CPU tests of
# worker processes (sedir_utils/engine/parallel.py, distributed training), where a model must load in a second.
WORDS = (
    "What is the value of x if two plus three apples cost more than a train moving at speed ? Why does "
    "water boil at lower temperature on a mountain ? How many atoms are in one mole of carbon"
)


@pytest.fixture(scope="session")
def smoke_tokenizer_path() -> str:
    """The embedded model's tokenizer (the committed copy), for the tiny models."""
    return str(TOKENIZER)


def _save_with_tokenizer(model, tokenizer_path: str, folder: Path) -> str:
    from sedir_utils.core.models import load_tokenizer

    model.save_pretrained(folder)
    load_tokenizer(tokenizer_path).save_pretrained(folder)
    return str(folder)


def _qwen2_config(tokenizer, **extra):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory, smoke_tokenizer_path) -> str:
    """A random Qwen2 whose next-token distribution is mostly a fixed one over a few English words, with
    end of turn at ~8%: every layer is live (random weights), but the embeddings share one strong direction
    that the output layer reads, so samples end their turn within tens of tokens."""
    from transformers import Qwen2ForCausalLM

    from sedir_utils.core.models import load_tokenizer

    tokenizer = load_tokenizer(smoke_tokenizer_path)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(_qwen2_config(tokenizer))
    words = sorted(set(tokenizer(WORDS, add_special_tokens=False)["input_ids"]))
    hidden = model.config.hidden_size
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] += 4.0  # one shared direction dominates every input
        logits = torch.full((len(tokenizer),), -12.0)
        logits[words] = 0.0
        logits[tokenizer.eos_token_id] = float(torch.log(torch.tensor(0.08 * len(words))))
        model.lm_head.weight[:, 0] = logits / hidden**0.5
    return _save_with_tokenizer(model, smoke_tokenizer_path, tmp_path_factory.mktemp("tiny_policy"))


@pytest.fixture(scope="session")
def tiny_random(tmp_path_factory, smoke_tokenizer_path) -> str:
    """A plainly random Qwen2 with widely spread logits (weights drawn 15x wider than the default), so that
    greedy choices are not near-ties that rounding could flip: for comparing the engine with a reference."""
    from transformers import Qwen2ForCausalLM

    from sedir_utils.core.models import load_tokenizer

    tokenizer = load_tokenizer(smoke_tokenizer_path)
    torch.manual_seed(1)
    model = Qwen2ForCausalLM(_qwen2_config(tokenizer, initializer_range=0.3))
    return _save_with_tokenizer(model, smoke_tokenizer_path, tmp_path_factory.mktemp("tiny_random"))


@pytest.fixture(scope="session")
def tiny_reward_model(tmp_path_factory, smoke_tokenizer_path) -> str:
    from transformers import Qwen2ForSequenceClassification

    from sedir_utils.core.models import load_tokenizer

    tokenizer = load_tokenizer(smoke_tokenizer_path)
    torch.manual_seed(2)
    model = Qwen2ForSequenceClassification(_qwen2_config(tokenizer, num_labels=1))
    return _save_with_tokenizer(model, smoke_tokenizer_path, tmp_path_factory.mktemp("tiny_reward"))


@pytest.fixture
def training_rows() -> list[dict]:
    """16 SFT rows with one completion to learn (the launched-training tests: CPU processes and GPUs)."""
    return [
        {
            "prompt": [{"role": "user", "content": f"Say the word number {i % 4}."}],
            "completion": [{"role": "assistant", "content": "water boil mountain water boil mountain"}],
        }
        for i in range(16)
    ]


@pytest.fixture
def sft_section():
    """TRL SFT through ``accelerate launch`` with ``processes`` training processes and a global batch of 4:
    8 steps on ``training_rows`` (the launched-training tests: CPU processes and GPUs)."""
    from sedir_utils.core.params import FinetuneParams

    def section(processes: int):
        return FinetuneParams(
            backend="trl",
            num_processes=processes,
            per_device_train_batch_size=4 // processes,
            num_train_epochs=2,
            learning_rate=3e-3,
            max_length=64,
        )

    return section
