"""The packaged lm-eval tasks (sedir_utils/lm_eval_tasks/) by name, and which of them generate, rotate or
hide the option letters."""

from __future__ import annotations

from sedir_utils.core.package import LM_EVAL_TASKS_DIR

LOCAL_TASK = "gpqa_local"  # log-likelihood of the option letter, as lm-eval's gpqa_*_zeroshot
LOCAL_COT_TASK = "gpqa_local_cot"  # chain of thought, generated, as lm-eval's gpqa_*_cot_zeroshot
CIRCULAR_TASK = "gpqa_local_circular"  # gpqa_local under the options' cyclic rotations
CLOZE_TASK = "gpqa_local_cloze"  # the log-likelihood of each option's text
PACKAGED_DIR = LM_EVAL_TASKS_DIR
LOCAL_TASKS = {
    LOCAL_TASK: "gpqa_local_zeroshot.yaml",
    LOCAL_COT_TASK: "gpqa_local_cot_zeroshot.yaml",
    CIRCULAR_TASK: "gpqa_local_circular.yaml",
    CLOZE_TASK: "gpqa_local_cloze.yaml",
}
GENERATIVE_TASKS = {LOCAL_COT_TASK}  # local tasks whose task file gets the params' generation budget
NO_LETTERS = {CLOZE_TASK}  # the model never sees option letters: no letter distribution
CIRCULAR = "circular"  # the metric derived from a circular task's per-rotation rows
