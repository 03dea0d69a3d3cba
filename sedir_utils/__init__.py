"""SeDiR (Self-Distilled Reasoner): shared code behind the notebooks in ``notebooks/``.

One module per stage (questions, responses, rewards, finetune, evaluation), a few shared ones
(config, io, models, generation, plots) and the runner that executes the notebooks with papermill.
"""

__version__ = "0.1.0"
