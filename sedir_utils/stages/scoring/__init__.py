"""Stage 3, declared "reward": audit the scorers on a labelled probe, score every answer with its
reasoning, pair the best and the worst."""
