"""SeDiR (Self-Distilled Reasoner): shared code behind the notebooks in ``notebooks/``.

``stages`` declares the five stages (notebook, module, params, files read and written); one module per
stage does its work (questions, responses, rewards, finetune, evaluation); ``scorers`` is the registry
of reward scorers, beside ``pairing``, ``monitoring`` and ``audit``; shared modules (config, io, models,
generation, backends, the CPU sampler ``cpu_engine``, plots, stats, notebook) import no stage; ``runner``
executes the notebooks with papermill.
"""

__version__ = "0.1.0"
