"""Progress bars: an ipywidgets bar in a notebook kernel (JupyterLab), text with rate and time left where the
runner prints a kernel's output."""

import nbformat
import papermill as pm

CODE = """from sedir_utils.core.progress import bar
for _ in bar(range(3), desc="answers", unit="seq"):
    pass"""


def _run(tmp_path, env_line: str):
    book = nbformat.v4.new_notebook()
    book.cells = [nbformat.v4.new_code_cell(env_line), nbformat.v4.new_code_cell(CODE)]
    source, out = tmp_path / "in.ipynb", tmp_path / "out.ipynb"
    nbformat.write(book, source)
    pm.execute_notebook(str(source), str(out), kernel_name="python3", progress_bar=False)
    return nbformat.read(out, as_version=4).cells[1].outputs


def test_in_a_notebook_the_bar_is_a_widget_and_no_fallback_warning_is_printed(tmp_path, processes):
    outputs = _run(tmp_path, "import os; os.environ.pop('SEDIR_TEXT_PROGRESS', None)")
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs)
    assert not any("IProgress" in o.get("text", "") for o in outputs)


def test_for_the_runner_the_bar_is_text_with_its_rate_and_time_left(tmp_path, processes):
    outputs = _run(tmp_path, "import os; os.environ['SEDIR_TEXT_PROGRESS'] = '1'")
    text = "".join(o.get("text", "") for o in outputs)
    assert not any("data" in o for o in outputs)
    assert "answers: 100%" in text and "3/3 [" in text and "seq/s]" in text
