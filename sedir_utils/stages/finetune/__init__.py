"""Stage 4: select the arm's training data and fine-tune the latest model (SFT, DPO or OPSD; TRL
or Unsloth)."""
