"""SeDiR (Self-Distilled Reasoner): the code behind the notebooks in ``notebooks/``, in layers, each importing
only those below it (``make lint`` checks, with import-linter):

- ``run``: the command line, the runner (papermill), fingerprints, the manifest, preflight, notebook set-up;
- ``stages``: one package per stage (questions, responses, scoring, finetune, evaluation), none importing
  another, and what two of them share (``probe``, ``pairs``);
- ``share`` (plots, report, cards, publish, tracking, the run's summary) and ``engine`` (sampling types,
  backends, worker processes, scorers, embeddings, the CPU sampler);
- ``core``: run paths, JSON I/O, the stage and arm declarations, params, models, statistics.
"""

__version__ = "0.1.0"
