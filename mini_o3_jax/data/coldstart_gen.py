"""Model-driven cold-start collection: few-shot prompting, K samples per question, keep the correct ones.

The paper builds its cold-start SFT set by prompting an existing VLM with a few exemplar trajectories in
context, sampling several trajectories per question, and keeping only those that reach the correct
answer. This module does that with our `Sampler`:

  exemplars  complete trajectories (e.g. the scripted explorer's, read from JSONL), rendered as earlier
             conversation turns with their images, before the question (`Task.context`). They shape the
             prompt only; the written data holds the question's own trajectory, as SFT needs it.
  sampling   K rollouts per question. Sample k of question q draws from its own key (seed, q's id, k),
             so a trajectory does not depend on batching, on the other questions, or on a resume.
  filter     per sample, the first reason that applies (`REASONS`): overturn (cut by a turn, token,
             context or image limit), no_answer, tool_error (a failed call; configurable), too_few_crops
             (fewer successful zooms than `min_crops`), wrong (the judge against the gold answer); then,
             in sample order, duplicate (the same turns as a kept sample) and over_cap (M already kept).
  output     out_dir/trajectories.jsonl + out_dir/images/, in `coldstart.write_jsonl_with_images`'s
             format (one `Trajectory.to_json_dict()` a line, images as PNG paths relative to out_dir), so
             SFT reads it unchanged; progress.jsonl (one line per finished question); summary.json.

Resume. A finished question appends its kept lines to trajectories.jsonl, then its line to
progress.jsonl, each in one write that is flushed and fsynced. A rerun first repairs: it keeps the
progress lines that parse (a torn last line is dropped), drops trajectory lines of questions without a
progress line (a run killed between the two writes) and torn lines, rewrites the files atomically, and
then skips the finished questions. The summary is computed from progress.jsonl, so an interrupted and
resumed run ends with the same files and summary as an uninterrupted one. run.json records the settings;
resuming into a directory written with other settings is an error rather than a silent mix.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import time
import zlib
from typing import Any, Callable, Iterable, Mapping, Sequence

from mini_o3_jax.agent.task import Task
from mini_o3_jax.agent.trajectory import Trajectory
from mini_o3_jax.data import coldstart_store, synthetic
from mini_o3_jax import progress as progress_lib

log = logging.getLogger(__name__)

REASONS = ("overturn", "no_answer", "tool_error", "too_few_crops", "wrong", "duplicate", "over_cap")

# judge(question, prediction, gold, options) -> bool, as `agent.RuleJudge` / `agent.LLMJudge`.
JudgeFn = Callable[[str, "str | None", str, "Sequence[str] | None"], bool]
# policy(question id, sample index, trajectory so far) -> forced opening of the next turn (see Sampler).
SamplePolicy = Callable[[str, int, Trajectory], "str | Sequence[int] | None"]


@dataclasses.dataclass(frozen=True)
class CollectConfig:
  """How many samples to draw, which to keep.

  samples_per_question: K rollouts per question (temperature comes from the sampler's config).
  max_kept_per_question: M, the most kept per question (the first M survivors in sample order).
  drop_tool_errors: drop samples with a failed tool call (an error turn); off keeps recoveries from
    malformed calls as training data.
  min_crops: drop samples with fewer successful zooms (cold-start data is meant to teach zooming).
  questions_per_batch: questions rolled out together (K x this many tasks share the sampler's slots).
  seed: base seed of every sample's key.
  """
  samples_per_question: int = 8
  max_kept_per_question: int = 2
  drop_tool_errors: bool = True
  min_crops: int = 1
  questions_per_batch: int = 4
  seed: int = 0

  def __post_init__(self):
    for name in ("samples_per_question", "max_kept_per_question", "questions_per_batch"):
      if getattr(self, name) < 1:
        raise ValueError(f"CollectConfig.{name} must be >= 1, got {getattr(self, name)}")
    if self.min_crops < 0:
      raise ValueError(f"CollectConfig.min_crops must be >= 0, got {self.min_crops}")


# --------------------------------------------------------------------------------------------------
# Inputs: exemplars and questions.


def load_exemplars(path: str, limit: int | None = None) -> list[Trajectory]:
  """Exemplar trajectories from a JSONL file (images resolved against the file's directory, loaded).

  Raises:
    FileNotFoundError: the file or one of its images is missing.
    ValueError: the file holds no trajectory, a line is not one, or an exemplar does not end in an
      answer (an exemplar is a complete demonstration).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"exemplar file not found: {path} (write one with "
                            "coldstart.write_jsonl_with_images, or let the stage script its own)")
  base = os.path.dirname(os.path.abspath(path))
  out = []
  for n, line in coldstart_store.read_jsonl_lines(path):
    if limit is not None and len(out) >= limit:
      break
    traj = Trajectory.from_json(line, f"{path}:{n}")
    if traj.final_answer is None:
      raise ValueError(f"{path}:{n}: exemplar {traj.id!r} does not end in an <answer> (stop_reason "
                       f"{traj.stop_reason!r}); exemplars must be complete trajectories")
    try:
      out.append(traj.load_images(base))
    except FileNotFoundError as e:
      raise FileNotFoundError(f"{path}:{n}: exemplar {traj.id!r} image missing: {e}") from e
  if not out:
    raise ValueError(f"exemplar file {path} holds no trajectories")
  return out


def exemplar_context(exemplars: Sequence[Trajectory]) -> list[dict[str, Any]]:
  """The exemplars as one conversation (images embedded), to put before the question."""
  messages = []
  for traj in exemplars:
    if traj.final_answer is None:
      raise ValueError(f"exemplar {traj.id!r} does not end in an answer")
    messages += traj.to_messages(embed_images=True)
  return messages


@dataclasses.dataclass(frozen=True)
class Question:
  """A question by id, loaded only when its batch runs (images stay on disk until then)."""
  id: str
  load: Callable[[], Task]


def synthetic_questions(tiers: Sequence[str], split: str, n_per_tier: int,
                        task_config: synthetic.SyntheticConfig = synthetic.SyntheticConfig(),
                        start: int = 0) -> list[Question]:
  """Items start .. start + n_per_tier - 1 of each tier, tier after tier."""
  out = []
  for tier in tiers:
    task_config.tier(tier)  # validates the name now, not when the batch runs
    for index in range(start, start + n_per_tier):

      def load(tier=tier, index=index) -> Task:
        t = synthetic.make_task(tier, index, task_config, split)
        return Task(image=t.image, question=t.question, gold=t.answer, id=t.id)

      out.append(Question(synthetic.task_id(tier, split, index), load))
  return out


def benchmark_questions(dataset: Sequence[Mapping[str, Any]]) -> list[Question]:
  """Questions of a `data.load_benchmark` split (or any sequence of such records)."""
  if hasattr(dataset, "row"):
    ids = [dataset.row(i).id for i in range(len(dataset))]  # no image decoded
  else:
    ids = [dataset[i]["id"] for i in range(len(dataset))]
  return [Question(qid, lambda i=i: Task.from_record(dataset[i])) for i, qid in enumerate(ids)]


# --------------------------------------------------------------------------------------------------
# The filter (pure functions of trajectories).


def sample_key(question_id: str, sample: int) -> int:
  """The sampler key id of sample `sample` of a question: depends on nothing else."""
  return zlib.crc32(f"{question_id}\0{sample}".encode()) & 0x7FFFFFFF


def num_crops(traj: Trajectory) -> int:
  return sum(t.observation_index is not None for t in traj.turns)


def is_correct(traj: Trajectory, judge: JudgeFn) -> bool:
  answer = traj.final_answer
  return answer is not None and traj.gold is not None and bool(
      judge(traj.question, answer, traj.gold, traj.options))


def sample_reason(traj: Trajectory, correct: bool, config: CollectConfig) -> str | None:
  """Why one sample is dropped on its own (None: it qualifies); the first reason in `REASONS` order."""
  if traj.overturn:
    return "overturn"
  if traj.final_answer is None:
    return "no_answer"
  if config.drop_tool_errors and any(t.error is not None for t in traj.turns):
    return "tool_error"
  if num_crops(traj) < config.min_crops:
    return "too_few_crops"
  if not correct:
    return "wrong"
  return None


def trajectory_key(traj: Trajectory) -> tuple[str, ...]:
  """Two samples of a question with equal keys are the same trajectory: the turns' exact texts (the
  crops and user turns follow from them). Exact, because any other text is a different SFT target."""
  return tuple(t.text for t in traj.turns)


def select(trajectories: Sequence[Trajectory], reasons: Sequence[str | None],
           max_kept: int) -> list[str | None]:
  """Adds duplicate / over_cap to the qualifying samples, in sample order; None = kept."""
  out, seen = list(reasons), set()
  for k, traj in enumerate(trajectories):
    if out[k] is not None:
      continue
    key = trajectory_key(traj)
    if key in seen:
      out[k] = "duplicate"
    elif len(seen) >= max_kept:
      out[k] = "over_cap"
    else:
      seen.add(key)
  return out


@dataclasses.dataclass
class QuestionOutcome:
  """One finished question: its kept trajectories and a verdict per sample."""
  id: str
  kept: list[Trajectory]
  reasons: list[str | None]
  correct: list[bool]
  turns: list[int]
  stop_reasons: list[str]

  def record(self) -> dict[str, Any]:
    """Its progress.jsonl line (everything the summary needs)."""
    return {"id": self.id, "kept": len(self.kept), "reasons": self.reasons, "correct": self.correct,
            "turns": self.turns, "stop_reasons": self.stop_reasons}


def judge_question(question_id: str, trajectories: Sequence[Trajectory], judge: JudgeFn,
                   config: CollectConfig, metadata: Mapping[str, Any] | None = None) -> QuestionOutcome:
  """Judges, filters, dedupes and caps the K samples of one question."""
  correct = [is_correct(t, judge) for t in trajectories]
  reasons = select(trajectories, [sample_reason(t, c, config) for t, c in zip(trajectories, correct)],
                   config.max_kept_per_question)
  kept = []
  for k, (traj, reason) in enumerate(zip(trajectories, reasons)):
    if reason is None:
      meta = {**traj.metadata, **(metadata or {}), "sample": k, "correct": True}
      kept.append(dataclasses.replace(traj, turns=list(traj.turns), images=list(traj.images), metadata=meta))
  return QuestionOutcome(id=question_id, kept=kept, reasons=reasons, correct=correct,
                         turns=[t.num_turns for t in trajectories],
                         stop_reasons=[str(t.stop_reason) for t in trajectories])


# --------------------------------------------------------------------------------------------------
# Summary.


def _mean(xs: Sequence[float]) -> float | None:
  return round(sum(xs) / len(xs), 4) if xs else None


def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Counts over progress records: questions, samples, kept, accuracy, pass@K, turns, drops."""
  samples = sum(len(r["correct"]) for r in records)
  drops = collections.Counter(x for r in records for x in r["reasons"] if x is not None)
  kept_turns = [n for r in records for n, x in zip(r["turns"], r["reasons"]) if x is None]
  ks = sorted({len(r["correct"]) for r in records})
  return {
      "questions": len(records),
      "samples": samples,
      "samples_per_question": ks[0] if len(ks) == 1 else ks,
      "kept": sum(r["kept"] for r in records),
      "questions_with_kept": sum(r["kept"] > 0 for r in records),
      "accuracy": _mean([float(c) for r in records for c in r["correct"]]),
      "pass_at_k": _mean([float(any(r["correct"])) for r in records]),
      "mean_turns": _mean([n for r in records for n in r["turns"]]),
      "mean_turns_kept": _mean(kept_turns),
      "drops": {reason: drops.get(reason, 0) for reason in REASONS},
      "stop_reasons": dict(sorted(collections.Counter(s for r in records for s in r["stop_reasons"]).items())),
      "kept_per_question": {str(k): v for k, v in sorted(collections.Counter(r["kept"] for r in records).items())},
      "kept_turns": {str(k): v for k, v in sorted(collections.Counter(kept_turns).items())},  # histogram
  }


def format_summary(summary: Mapping[str, Any]) -> str:
  """A few readable lines for the console."""
  pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
  drops = ", ".join(f"{k} {v}" for k, v in summary["drops"].items() if v) or "none"
  return "\n".join([
      f"cold-start collection: {summary['questions']} questions x {summary['samples_per_question']} samples "
      f"= {summary['samples']} samples",
      f"  kept {summary['kept']} trajectories from {summary['questions_with_kept']} questions",
      f"  accuracy {pct(summary['accuracy'])}, pass@K {pct(summary['pass_at_k'])}, mean turns "
      f"{summary['mean_turns']} (kept: {summary['mean_turns_kept']})",
      f"  dropped: {drops}",
      f"  stop reasons: {summary['stop_reasons']}",
  ])


# --------------------------------------------------------------------------------------------------
# The loop.


def _batches(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
  for i in range(0, len(items), size):
    yield items[i:i + size]


def _batch_policy(policy: SamplePolicy | None, k: int) -> Callable | None:
  """The Sampler's (task index, trajectory) hook from a (question id, sample, trajectory) one."""
  if policy is None:
    return None
  return lambda i, traj: policy(traj.id, i % k, traj)


def collect(sampler, questions: Sequence[Question], out_dir: str, *, judge: JudgeFn,
            config: CollectConfig = CollectConfig(), exemplars: Sequence[Trajectory] = (),
            settings: Mapping[str, Any] | None = None, info: Mapping[str, Any] | None = None,
            policy: SamplePolicy | None = None,
            on_question: Callable[[QuestionOutcome], None] | None = None,
            progress: bool = True) -> dict[str, Any]:
  """Collects cold-start trajectories for `questions` into `out_dir`; resumes what is already there.

  Args:
    sampler: a `sampler.Sampler` (its RolloutConfig sets temperature, turn and context limits).
    questions: unique ids; questions that are also exemplars are skipped (they would leak the answer).
    out_dir: the output directory (see the module docstring).
    judge: `agent.RuleJudge()` or an `agent.LLMJudge`.
    config: K, M and the filter.
    exemplars: complete trajectories shown before every question (few-shot); may be empty.
    settings: extra settings that shape the samples (e.g. the model), recorded in run.json and the
      summary; a resume must bring the same.
    info: recorded in the summary only (e.g. where the questions came from: a rerun may extend them).
    policy: optional (question id, sample, trajectory) -> forced turn opening (tests, ablations).
    on_question: called after each question is written (progress hooks; raising stops the run there).
    progress: show a tqdm bar.

  Returns:
    The summary (also written to out_dir/summary.json).
  """
  if not questions:
    raise ValueError("no questions to collect trajectories for")
  ids = [q.id for q in questions]
  if len(set(ids)) != len(ids):
    dup = [i for i, n in collections.Counter(ids).items() if n > 1]
    raise ValueError(f"question ids must be unique; repeated: {dup[:5]}")
  exemplar_ids = {t.id for t in exemplars if t.id is not None}
  questions = [q for q in questions if q.id not in exemplar_ids]
  if not questions:
    raise ValueError("every question is also an exemplar")
  context = exemplar_context(exemplars) or None
  k = config.samples_per_question
  cfg = sampler.config
  run_settings = {
      **dataclasses.asdict(config), "temperature": cfg.sampling.temperature, "max_turns": cfg.max_turns,
      "max_context": cfg.max_context, "max_turn_tokens": cfg.max_turn_tokens,
      "min_pixels": cfg.min_pixels, "max_pixels": cfg.max_pixels,
      "judge": getattr(judge, "name", type(judge).__name__),
      "exemplars": [t.id for t in exemplars], **(settings or {})}
  run_settings.pop("questions_per_batch")  # batching does not change the samples
  out = coldstart_store.OutputDir(out_dir)
  out.check_settings(run_settings)
  records = out.recover()
  done = {r["id"] for r in records}
  pending = [q for q in questions if q.id not in done]
  meta = {"collector": "few_shot", "num_exemplars": len(exemplars), "seed": config.seed}
  start = time.time()
  n_kept = n_correct = n_samples = 0  # this run's, for the progress bar
  with progress_lib.bar(total=len(questions), initial=len(questions) - len(pending), desc="cold-start", unit="q",
                        disable=not progress) as bar:
    for batch in _batches(pending, config.questions_per_batch):
      tasks, key_ids = [], []
      for q in batch:
        task = q.load()
        if task.gold is None:
          raise ValueError(f"question {q.id!r} has no gold answer: the correctness filter needs one")
        task = dataclasses.replace(task, id=q.id, context=context)
        tasks += [task] * k
        key_ids += [sample_key(q.id, s) for s in range(k)]
      results = sampler.rollout(tasks, seed=config.seed, key_ids=key_ids, policy=_batch_policy(policy, k))
      for j, q in enumerate(batch):
        trajs = [r.trajectory for r in results[j * k:(j + 1) * k]]
        outcome = judge_question(q.id, trajs, judge, config, meta)
        out.append(outcome)
        records.append(outcome.record())
        n_kept += len(outcome.kept)
        n_correct += sum(outcome.correct)
        n_samples += k
        bar.update(1)
        bar.set_postfix(kept=n_kept, acc=f"{n_correct / n_samples:.2f}")
        if on_question is not None:
          on_question(outcome)
  summary = {**summarize(records), "settings": run_settings, **({"info": dict(info)} if info else {})}
  out.write_summary(summary)
  log.info("cold-start: %d new questions in %.1f s, %d kept in all (%s)", len(pending), time.time() - start,
           summary["kept"], out.dir)
  return summary
