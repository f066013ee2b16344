"""The visual-search agent in Hugging Face transformers, on a model this package exported (no JAX).

  python -m mini_o3_jax.main --config configs/demo.py --workdir /tmp/demo     # writes /tmp/demo/hf_export
  python examples/transformers_agent.py --model /tmp/demo/hf_export --tier hard --index 3

The export loads with `Qwen2_5_VLForConditionalGeneration`, its tokenizer and its image processor. The
loop is the agent's: generate one turn (greedy, stopping at `</grounding>` or `</answer>`), run the crop
tool on the image the call names, append the observation turn, and repeat until an answer or the turn
budget. Prompts, parsing and cropping come from `mini_o3_jax.agent`, so the turns are the ones the
package's JAX sampler produces. Each turn re-encodes the whole conversation (simple, not fast).
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
import transformers
from PIL import Image

from mini_o3_jax.agent import prompts, tools
from mini_o3_jax.agent.trajectory import Trajectory, execute_turn, terminal_stop_reason
from mini_o3_jax.data import synthetic


@dataclasses.dataclass
class Agent:
  """An exported model, its tokenizer and image processor (all read from one HF directory)."""
  model: transformers.PreTrainedModel
  tokenizer: transformers.PreTrainedTokenizerBase
  image_processor: transformers.BaseImageProcessor

  @classmethod
  def load(cls, directory: str) -> Agent:
    return cls(model=transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(directory).eval(),
               tokenizer=transformers.AutoTokenizer.from_pretrained(directory),
               image_processor=transformers.AutoImageProcessor.from_pretrained(directory))

  def inputs(self, traj: Trajectory) -> dict[str, torch.Tensor]:
    """The conversation so far as model inputs; each image's one <|image_pad|> becomes its patch tokens,
    as `Qwen2_5_VLProcessor` does."""
    text = self.tokenizer.apply_chat_template(traj.to_messages(), tokenize=False, add_generation_prompt=True)
    pixels = self.image_processor(images=list(traj.images), return_tensors="pt")
    merge = self.image_processor.merge_size ** 2
    pad = "<|image_pad|>"
    pieces = text.split(pad)
    if len(pieces) != len(traj.images) + 1:
      raise ValueError(f"{len(pieces) - 1} image placeholders for {len(traj.images)} images")
    expanded = pieces[0]
    for grid, piece in zip(pixels["image_grid_thw"], pieces[1:]):
      expanded += pad * (int(grid.prod()) // merge) + piece
    ids = self.tokenizer(expanded, add_special_tokens=False, return_tensors="pt")
    return {**ids, "pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"]}

  def next_turn(self, traj: Trajectory, max_new_tokens: int) -> str:
    """One greedy assistant turn, cut after its first stop string."""
    inputs = self.inputs(traj)
    with torch.no_grad():
      out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                stop_strings=list(prompts.STOP_STRINGS), tokenizer=self.tokenizer)
    new = out[0, inputs["input_ids"].shape[1]:]
    text = self.tokenizer.decode(new, skip_special_tokens=False)
    return tools.truncate_at_stop(text.split(self.tokenizer.eos_token)[0])

  def solve(self, image: Image.Image, question: str, *, max_turns: int = 6, max_new_tokens: int = 96
            ) -> Trajectory:
    """Runs the agent on one question about `image` until it answers or `max_turns` turns are used."""
    traj = Trajectory(question=question, images=[image])
    while traj.stop_reason is None:
      turn, observation = execute_turn(self.next_turn(traj, max_new_tokens), traj.images)
      traj.turns.append(turn)
      if observation is not None:
        traj.images.append(observation)
      traj.stop_reason = terminal_stop_reason(turn.action)
      if traj.stop_reason is None and traj.num_turns >= max_turns:
        traj.stop_reason = "max_turns"
    return traj


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--model", required=True, help="an HF directory written by the export stage")
  parser.add_argument("--tier", default="hard", choices=synthetic.TIERS, help="synthetic tier of the scene")
  parser.add_argument("--index", type=int, default=0, help="which test scene of the tier")
  parser.add_argument("--view_pixels", type=int, default=112 * 112, help="the demo's pixel budget of a view")
  parser.add_argument("--max_turns", type=int, default=6)
  args = parser.parse_args()
  task = synthetic.make_task(args.tier, args.index, synthetic.SyntheticConfig(
      view_min_pixels=args.view_pixels, view_max_pixels=args.view_pixels), split="test")
  traj = Agent.load(args.model).solve(task.image, task.question, max_turns=args.max_turns)
  print(f"Q: {task.question}  (gold {task.answer})")
  for k, turn in enumerate(traj.turns):
    print(f"turn {k}: {turn.text}" + (f"  [error: {turn.error}]" if turn.error else ""))
  print(f"answer: {traj.final_answer}  stop: {traj.stop_reason}  correct: {traj.final_answer == task.answer}")


if __name__ == "__main__":
  main()
