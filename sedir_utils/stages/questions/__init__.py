"""Stage 1: the model writes questions from an empty user turn; they are filtered, screened and
decontaminated."""
