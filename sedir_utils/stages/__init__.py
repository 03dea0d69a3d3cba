"""The loop's stages, one package each (questions, responses, scoring, finetune, evaluation), and what two
of them share (probe, pairs). No stage imports another.
"""
