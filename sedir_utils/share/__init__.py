"""What a run shows and hands on: plots, the report, model and dataset cards, tracking, publishing, the run's
summary. It imports core only.
"""
