import json
import tomllib
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
EXPECTED = ["01_questions", "02_responses", "03_reward", "04_finetune_unsloth", "05_eval"]
PARAMETERS = {"params_file", "overrides", "run_dir", "iteration"}


def test_environment_yml_installs_what_pyproject_declares():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert sorted(p for p in pip if not p.startswith("-e")) == sorted(declared)


def test_gpu_extra_is_unsloth_within_our_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(d.startswith("unsloth") for d in project["optional-dependencies"]["gpu"])
    pins = {d.split("==")[0]: d.split("==")[1] for d in project["dependencies"] if "==" in d}
    # Unsloth 2026.10 caps (../shared/NOTES.md): transformers<=5.17.0, trl<=1.15.0, datasets<5
    as_tuple = lambda v: tuple(int(x) for x in v.split("."))
    assert as_tuple(pins["transformers"]) <= (5, 17, 0)
    assert as_tuple(pins["trl"]) <= (1, 15, 0)
    assert as_tuple(pins["datasets"]) < (5,)


def test_the_five_notebooks_exist():
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
    names = {line.split("=")[0].strip() for line in tagged[0].source.splitlines()
             if "=" in line and not line.lstrip().startswith("#")}
    assert names == PARAMETERS
    assert "from sedir_utils import" in "\n".join(c.source for c in code)
    assert book.cells[0].cell_type == "markdown" and "section" in book.cells[0].source  # cites the paper


def test_notebooks_are_plain_json():
    for path in NOTEBOOKS:
        json.loads(path.read_text())


def test_colab_badges_and_install_cell_use_the_declared_repository():
    from sedir_utils.colab import COLAB_INSTALL, REPOSITORY, badge

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

    from sedir_utils.colab import COLAB_INSTALL

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sp, "run", lambda *a, **k: pytest.fail(f"ran {a}"))
    assert "google.colab" not in sys.modules
    path_before = list(sys.path)
    exec(COLAB_INSTALL, {})
    assert Path.cwd() == tmp_path and sys.path == path_before


def test_auto_params_follow_the_hardware(capsys):
    from sedir_utils.colab import pick_params_file
    from sedir_utils.config import load_params

    assert Path(pick_params_file("auto", cuda=False)).name == "embedded.yaml"
    assert "no CUDA device" in capsys.readouterr().out
    assert Path(pick_params_file("auto", cuda=True)).name == "colab-t4.yaml"
    assert pick_params_file("mine.yaml") == "mine.yaml"
    load_params(pick_params_file("auto", cuda=True))  # the Colab params load
