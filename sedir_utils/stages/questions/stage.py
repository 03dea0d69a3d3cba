"""Stage 1: the model writes its own questions from an empty user turn (paper, section 3.1).

The prompt is the system prompt followed by the opening of a user turn, taken from the tokenizer's own
chat template; whatever the model writes until it closes the turn is a question.
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np

from sedir_utils.core.gpqa import read_gpqa_file
from sedir_utils.core.io import StageError, read_jsonl, update_metrics, write_json, write_jsonl
from sedir_utils.core.models import load_causal_lm, load_tokenizer, resolve_model
from sedir_utils.core.paths import RunPaths
from sedir_utils.core.steering import assign_steering, steering_options
from sedir_utils.engine.backends import generator_args, load_generator, release
from sedir_utils.engine.embeddings import load_embedder, nearest
from sedir_utils.engine.generation import generate
from sedir_utils.engine.replicas import Replicas
from sedir_utils.engine.sampling import Generation, SamplingParams

FILTERS = (
    "empty",
    "truncated",
    "too_short",
    "too_long",
    "template_tokens",
    "not_a_request",
    "self_answer",
    "script",
    "duplicate",
    "contaminated",
    "near_duplicate",
)
_SENTINEL = "SEDIR_USER_TURN_SENTINEL"


def question_prompt(tokenizer, system_prompt: str) -> str:
    """The empty-template prompt: the system prompt, then the opening of a user turn, nothing after.

    Derived by rendering a conversation whose user text is a sentinel and cutting at the sentinel, so it
    works for any template that places the user's text verbatim and never adds an assistant turn. A
    template with no system role (Gemma's raises on one) gets the system text where such templates put
    it: at the start of the user turn, which the model then continues.
    """
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": _SENTINEL}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        folded = False
    except Exception:  # jinja raises whatever the template author chose, e.g. "System role not supported"
        merged = f"{system_prompt}\n\n{_SENTINEL}" if system_prompt.strip() else _SENTINEL
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": merged}], tokenize=False, add_generation_prompt=False
            )
        except Exception as exc:
            raise ValueError(f"the tokenizer's chat template rejects a plain user turn: {exc}") from None
        folded = True
    if text.count(_SENTINEL) != 1:
        raise ValueError("the tokenizer's chat template does not place the user text verbatim")
    prefix = text[: text.index(_SENTINEL)]
    if system_prompt.strip() and system_prompt.strip() not in prefix:
        raise ValueError("the tokenizer's chat template dropped the system prompt")
    if folded and not prefix.endswith("\n\n"):
        raise ValueError("the tokenizer's chat template changed the user text")
    return prefix


def template_markers(tokenizer) -> list[str]:
    """Special tokens that must never appear inside a question (they would forge turns)."""
    return sorted(
        {t for t in tokenizer.all_special_tokens if len(t) > 1} | set(getattr(tokenizer, "added_tokens_encoder", {}))
    )


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


# A request starts with one of these (an imperative, "I need ...", or a question word without its '?').
REQUEST_STARTS = {
    "write",
    "explain",
    "describe",
    "calculate",
    "compute",
    "solve",
    "find",
    "prove",
    "show",
    "list",
    "give",
    "name",
    "determine",
    "evaluate",
    "simplify",
    "compare",
    "summarize",
    "summarise",
    "design",
    "create",
    "implement",
    "translate",
    "derive",
    "estimate",
    "identify",
    "classify",
    "suggest",
    "help",
    "tell",
    "please",
    "consider",
    "suppose",
    "imagine",
    "let",
    "given",
    "analyze",
    "analyse",
    "convert",
    "rewrite",
    "generate",
    "draft",
    "outline",
    "discuss",
    "predict",
    "choose",
    "select",
    "rank",
    "sort",
    "fix",
    "debug",
    "i",
    "i'm",
    "my",
    "we",
    "assume",
    "if",
    "using",
    "use",
    "complete",
    "fill",
    "answer",
    "decide",
    "plan",
    # questions that forgot their question mark
    "what",
    "why",
    "how",
    "which",
    "who",
    "whom",
    "whose",
    "when",
    "where",
    "is",
    "are",
    "can",
    "could",
    "would",
    "should",
    "do",
    "does",
    "did",
    "will",
    "may",
}
# The model answering its own question inside the user turn: an answer or solution label on its own line.
_SELF_ANSWER = re.compile(
    r"(^|\n)\s*(\**)(answer|solution|final answer|a|response|assistant)\s*\2\s*[:：]", re.IGNORECASE
)


def is_request(text: str) -> bool:
    """A question (a '?') or a request (starts with an imperative or 'I ...')."""
    if "?" in text:
        return True
    words = re.findall(r"[A-Za-z']+", text.lower())
    return bool(words) and words[0] in REQUEST_STARTS


def answers_itself(text: str) -> bool:
    return bool(_SELF_ANSWER.search(text)) or bool(re.search(r"\?\s*\n+\s*the answer is\b", text, re.IGNORECASE))


def latin_share(text: str) -> float:
    """Share of the letters that are Latin script (accents included): a language check needing no model."""
    import unicodedata

    letters = [c for c in text if c.isalpha()]
    return sum(unicodedata.name(c, "").startswith("LATIN") for c in letters) / len(letters) if letters else 1.0


def filter_questions(
    generations: list[Generation],
    markers: list[str],
    min_chars: int,
    max_chars: int,
    seen: set[str] | None = None,
    *,
    require_request: bool = True,
    drop_self_answers: bool = True,
    script: str | None = None,
) -> tuple[list[tuple[int, str]], Counter]:
    """The text filters, in ``FILTERS`` order; returns kept (index, question) and drops per filter.

    ``seen`` holds normalised questions already kept (earlier rounds); it is updated in place. Questions
    are never cut: multi-line and multiple-choice questions are kept whole.
    """
    seen = set() if seen is None else seen
    dropped: Counter = Counter({name: 0 for name in FILTERS})
    kept: list[tuple[int, str]] = []
    for i, gen in enumerate(generations):
        text = gen.text.strip()
        if not text:
            reason = "empty"
        elif not gen.finished:
            reason = "truncated"
        elif len(text) < min_chars:
            reason = "too_short"
        elif len(text) > max_chars:
            reason = "too_long"
        elif any(m in text for m in markers):
            reason = "template_tokens"
        elif require_request and not is_request(text):
            reason = "not_a_request"
        elif drop_self_answers and answers_itself(text):
            reason = "self_answer"
        elif script == "latin" and latin_share(text) < 0.95:
            reason = "script"
        elif normalise(text) in seen:
            reason = "duplicate"
        else:
            seen.add(normalise(text))
            kept.append((i, text))
            continue
        dropped[reason] += 1
    return kept, dropped


def word_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


class Screen:
    """Embedding filters: contamination (eval set) and near duplicates (this iteration and earlier ones).

    A question is ``contaminated`` if it shares a word ``ngram`` with an evaluation question or its
    embedding is within ``contamination_threshold`` (cosine) of one; a ``near_duplicate`` if within
    ``near_threshold`` of a question kept earlier in this iteration or in an earlier iteration
    (Crescent's history). Keeps a few examples of each with their similarity.
    """

    def __init__(
        self,
        embedder,
        *,
        history: list[tuple[str, str]] = (),
        eval_texts: list[str] = (),
        near_threshold: float = 0.9,
        contamination_threshold: float = 0.85,
        ngram: int = 8,
        examples: int = 5,
    ):
        self.embedder, self.near, self.contam, self.n, self.max_examples = (
            embedder,
            near_threshold,
            contamination_threshold,
            ngram,
            examples,
        )
        self.pool_texts = [t for t, _ in history]
        self.pool_sources = [src for _, src in history]
        self.pool = embedder.encode(self.pool_texts) if embedder and history else None
        self.eval_texts = list(eval_texts)
        self.eval_emb = embedder.encode(self.eval_texts) if embedder and self.eval_texts else None
        self.eval_grams = {g: i for i, t in enumerate(self.eval_texts) for g in word_ngrams(t, ngram)}
        self.examples: dict[str, list[dict]] = {"near_duplicate": [], "contaminated": []}
        self.kept_emb: list[np.ndarray] = []

    def _example(self, reason: str, text: str, other: str, sim: float, source: str, **extra) -> None:
        if len(self.examples[reason]) < self.max_examples:
            self.examples[reason].append(
                {"question": text, "nearest": other, "similarity": round(float(sim), 3), "source": source, **extra}
            )

    def check(self, texts: list[str]) -> list[str | None]:
        """The reason each text is dropped (None: kept, and it joins the pool for later texts)."""
        emb = self.embedder.encode(texts) if self.embedder else None
        reasons: list[str | None] = []
        for j, text in enumerate(texts):
            vec = emb[j : j + 1] if emb is not None else None
            shared = next((g for g in word_ngrams(text, self.n) if g in self.eval_grams), None)
            if shared is not None:
                other = self.eval_texts[self.eval_grams[shared]]
                sim = float((vec @ self.eval_emb[self.eval_grams[shared]]).item()) if vec is not None else 1.0
                self._example("contaminated", text, other, sim, "eval", ngram=" ".join(shared))
                reasons.append("contaminated")
                continue
            if vec is not None and self.eval_emb is not None:
                idx, sim = nearest(vec, self.eval_emb)
                if sim[0] >= self.contam:
                    self._example("contaminated", text, self.eval_texts[idx[0]], sim[0], "eval")
                    reasons.append("contaminated")
                    continue
            if vec is not None and self.pool is not None and len(self.pool):
                idx, sim = nearest(vec, self.pool)
                if sim[0] >= self.near:
                    self._example("near_duplicate", text, self.pool_texts[idx[0]], sim[0], self.pool_sources[idx[0]])
                    reasons.append("near_duplicate")
                    continue
            reasons.append(None)
            if vec is not None:
                self.pool = vec if self.pool is None else np.concatenate([self.pool, vec])
                self.pool_texts.append(text)
                self.pool_sources.append("this iteration")
                self.kept_emb.append(vec[0])
        return reasons


def diversity(texts: list[str], embeddings: np.ndarray | None) -> dict:
    """Distinct-1/2 (unique over all word uni/bigrams) and mean pairwise cosine distance of the questions."""
    words = [re.findall(r"\w+", t.lower()) for t in texts]
    unigrams = [w for ws in words for w in ws]
    bigrams = [tuple(ws[i : i + 2]) for ws in words for i in range(len(ws) - 1)]
    out = {
        "questions": len(texts),
        "distinct_1": round(len(set(unigrams)) / len(unigrams), 4) if unigrams else None,
        "distinct_2": round(len(set(bigrams)) / len(bigrams), 4) if bigrams else None,
        "mean_pairwise_distance": None,
    }
    if embeddings is not None and len(embeddings) > 1:
        sims = embeddings @ embeddings.T
        n = len(embeddings)
        out["mean_pairwise_distance"] = round(float(1 - (sims.sum() - np.trace(sims)) / (n * (n - 1))), 4)
    return out


def synthesize_questions(
    model,
    tokenizer,
    section,
    *,
    seed: int,
    iteration: int,
    model_name: str,
    generate_fn=generate,
    checkpoint=None,
    screen: Screen | None = None,
) -> tuple[list[dict], dict]:
    """Sample questions until ``section.num_questions`` survive the filters or rounds run out.

    ``checkpoint``: a folder for finished chunks of each round, so a rerun after a crash resumes.
    ``screen``: the embedding filters (near duplicates, contamination); without it only the text filters run.
    Returns the rows (with provenance, the steering option included) and statistics: generated, kept,
    drops per filter, the surplus, examples of what the screen dropped.
    """
    options = steering_options(section.system_prompt)
    prompts = [question_prompt(tokenizer, o.prompt) for o in options]
    markers = template_markers(tokenizer)
    sampling = SamplingParams.from_section(section)
    seen: set[str] = set()
    rows: list[dict] = []
    dropped: Counter = Counter({name: 0 for name in FILTERS})
    generated = 0
    for round_ in range(section.max_rounds):
        missing = section.num_questions - len(rows)
        if missing <= 0:
            break
        # Over-generate: after round 0, scale by the observed survival rate (at least 2x what is missing).
        survival = len(rows) / generated if generated else 0.5
        count = min(8 * missing, max(2 * missing, math.ceil(missing / max(survival, 1e-3))))
        count = math.ceil(count / section.batch_size) * section.batch_size
        choice = assign_steering(options, count, seed + 1000 * round_)
        extra = (
            {"checkpoint": Path(checkpoint) / f"round{round_}", "chunk_size": section.chunk_size}
            if checkpoint is not None
            else {}
        )
        gens = generate_fn(
            model,
            tokenizer,
            [prompts[c] for c in choice],
            sampling,
            section.batch_size,
            seed=seed + 1000 * round_,
            desc=f"questions, round {round_ + 1}",
            **extra,
        )
        generated += count
        kept, drops = filter_questions(
            gens,
            markers,
            section.min_chars,
            section.max_chars,
            seen,
            require_request=section.require_request,
            drop_self_answers=section.drop_self_answers,
            script=section.script,
        )
        dropped.update(drops)
        if screen is not None:
            # Screen only as many as needed, in order, so the surplus is never embedded into the history.
            survivors = []
            for i, text in kept:
                if len(rows) + len(survivors) >= section.num_questions:
                    break
                reason = screen.check([text])[0]
                if reason:
                    dropped[reason] += 1
                else:
                    survivors.append((i, text))
            kept = survivors
        for i, text in kept[:missing]:
            option = options[choice[i]]
            rows.append(
                {
                    "id": f"it{iteration}-q{len(rows):04d}",
                    "question": text,
                    "num_tokens": gens[i].num_tokens,
                    "iteration": iteration,
                    "model": model_name,
                    "steering": option.name,
                    "system_prompt": option.prompt,
                    "sampling": sampling.as_dict(),
                    "seed": seed,
                    "round": round_,
                }
            )
    stats = {
        "generated": generated,
        "kept": len(rows),
        "target": section.num_questions,
        "dropped": dict(dropped),
        # samples that passed every filter after the target was reached: generated = kept + dropped + surplus
        "surplus": generated - len(rows) - sum(dropped.values()),
        "steering": dict(Counter(r["steering"] for r in rows)),
        "examples": screen.examples if screen is not None else {},
    }
    if not rows:
        worst = max(dropped, key=dropped.get)
        raise StageError(
            f"questions: none of {generated} samples survived the filters; '{worst}' dropped "
            f"{dropped[worst]} (drops: {dict(dropped)})"
        )
    return rows, stats


def earlier_questions(paths) -> list[tuple[str, str]]:
    """(question, "iter_<j>") for every question kept by earlier iterations of this run."""
    out = []
    for j in range(1, paths.iteration):
        earlier = paths.of(j).questions
        if earlier.is_file():
            out.extend((row["question"], f"iter_{j}") for row in read_jsonl(earlier))
    return out


def eval_question_texts(params) -> list[str]:
    """The evaluation set's questions, to decontaminate against: the local GPQA-format file, and the hub's
    GPQA when a hub ``gpqa_*`` task is evaluated (needs the hub and a token; unverified here)."""
    texts = []
    local = [t for t in params.eval.tasks if t.startswith("gpqa_local")]
    if local and params.eval.local_file:
        texts += [row["Question"] for row in read_gpqa_file(params.eval.local_file, "eval.local_file")]
    if any(t.startswith("gpqa_") and not t.startswith("gpqa_local") for t in params.eval.tasks):
        from datasets import load_dataset

        for subset in ("gpqa_main", "gpqa_diamond", "gpqa_extended"):
            texts += list(load_dataset("Idavidrein/gpqa", subset, split="train")["Question"])
    return list(dict.fromkeys(t.strip() for t in texts if t and t.strip()))


def question_embedder(params, model_path: str, policy=None):
    """The embedder ``questions.embedder`` names (None for ``none``); ``policy`` pools the transformers
    policy (``policy`` if already loaded, else loaded from ``model_path``). The last one built is kept, so
    the stage and the notebook's diversity map share it; a ``policy`` embedder is kept for that model folder
    as its files are now (a model retrained into the same folder is loaded again), and only one at a time."""
    kind = params.questions.embedder
    if kind == "none":
        return None
    key: tuple = (kind,)
    if kind == "policy":
        weights = Path(model_path) / "model.safetensors"
        stamp = (weights.stat().st_size, weights.stat().st_mtime_ns) if weights.is_file() else None
        key = (kind, model_path, params.model.dtype, stamp)
    if key not in _EMBEDDERS:
        _EMBEDDERS.clear()
        if kind == "policy":
            policy = policy if policy is not None else load_causal_lm(model_path, params.model.dtype)
            _EMBEDDERS[key] = load_embedder("policy", policy, load_tokenizer(model_path, padding_side="right"))
        else:
            _EMBEDDERS[key] = load_embedder(kind)
    return _EMBEDDERS[key]


_EMBEDDERS: dict[tuple, object] = {}


def run(params, paths) -> tuple[list[dict], dict]:
    """The stage as the notebook runs it: sample with the latest model, write ``questions.jsonl``.

    Also writes the filter counts and examples (``question_filters.json``) and the diversity figures
    (``metrics.json``, section ``questions``).
    """
    section = params.questions
    model_path = paths.policy_model(resolve_model(params.model.name))
    models: dict = {}
    model, backend = load_generator(model_path, **generator_args(params.model), cache=models)
    try:
        tokenizer = load_tokenizer(model_path)
        in_memory = backend.transformers_model and not isinstance(model, Replicas)  # workers' models are not here
        embedder = question_embedder(params, model_path, model if in_memory else None)
        screen = Screen(
            embedder,
            history=earlier_questions(paths) if section.dedup_history else [],
            eval_texts=eval_question_texts(params) if section.decontaminate else [],
            near_threshold=section.near_duplicate_threshold,
            contamination_threshold=section.contamination_threshold,
            ngram=section.contamination_ngram,
        )
        rows, stats = synthesize_questions(
            model,
            tokenizer,
            section,
            seed=params.seed_for(paths.iteration),
            iteration=paths.iteration,
            model_name=paths.model_label(paths.iteration - 1, params.model.name),
            checkpoint=paths.partial("questions"),
            screen=screen,
            generate_fn=functools.partial(generate, backend=backend),
        )
    finally:
        release(models)
    embeddings = np.stack(screen.kept_emb[: len(rows)]) if embedder is not None and screen.kept_emb else None
    stats["embedder"] = section.embedder
    stats["decontaminated_against"] = len(screen.eval_texts)
    stats["history"] = len(screen.pool_texts) - len(screen.kept_emb)
    figures = diversity([r["question"] for r in rows], embeddings)
    figures["duplicate_rate"] = round(
        (stats["dropped"]["duplicate"] + stats["dropped"]["near_duplicate"]) / max(stats["generated"], 1), 4
    )
    figures["contaminated"] = stats["dropped"]["contaminated"]
    figures["kept_share"] = round(stats["kept"] / max(stats["generated"], 1), 4)
    stats["diversity"] = figures
    write_json(paths.question_stats, stats)
    update_metrics(paths.metrics, "questions", {"dropped": stats["dropped"], **figures})
    write_jsonl(paths.questions, rows)
    paths.clear_partial("questions")
    return rows, stats


def question_map(run_dir, iterations: list[int], embedder) -> tuple[np.ndarray, list[int], list[str]]:
    """A 2-D map (first two principal components) of every iteration's questions, for the notebook's plot."""
    texts, labels = [], []
    for k in iterations:
        path = RunPaths(run_dir, k).questions
        if path.is_file():
            for row in read_jsonl(path):
                texts.append(row["question"])
                labels.append(k)
    if len(texts) < 3:
        return np.zeros((len(texts), 2)), labels, texts
    emb = embedder.encode(texts)
    centred = emb - emb.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T, labels, texts
