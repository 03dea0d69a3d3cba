"""The top layer: the command line, the runner with its fingerprints and manifest, preflight, notebook
set-up, Colab."""
