"""Stage 2: chain-of-thought answers per question, after an optional sweep of temperatures and
thresholds on the probe (balance)."""
