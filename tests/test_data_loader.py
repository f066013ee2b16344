"""grain pipeline: trajectories -> tokenized examples -> shuffled, host-sharded, resumable batches."""

import numpy as np
import pytest

from mini_o3_jax import agent
from mini_o3_jax.data import coldstart, loader
from mini_o3_jax.processing import tokenizer as tok_lib

VIEW = 112 * 112


@pytest.fixture(scope="module")
def setup():
  trajs = list(coldstart.scripted_coldstart("medium", 10))
  corpus = [m["content"] if isinstance(m["content"], str) else " ".join(c.get("text", "") for c in m["content"])
            for t in trajs for m in t.to_messages()]
  tok = tok_lib.build_small_tokenizer(corpus, vocab_size=600)
  cfg = loader.ExampleConfig(min_pixels=VIEW, max_pixels=VIEW)
  return trajs, tok, cfg


def test_example_tokens_images_and_loss_mask(setup):
  trajs, tok, cfg = setup
  ids = tok_lib.special_token_ids(tok)
  for t in trajs[:4]:
    ex = loader.trajectory_example(t, tok, cfg)
    n_img_tokens = int((ex["input_ids"] == ids["image_token_id"]).sum())
    assert len(ex["image_grid_thw"]) == len(t.images)
    assert n_img_tokens == int(np.prod(ex["image_grid_thw"], -1).sum()) // 4
    assert ex["pixel_values"].shape[0] == int(np.prod(ex["image_grid_thw"], -1).sum())
    # The loss covers the assistant turns' text (and their <|im_end|>), never an image token.
    text = tok.decode(ex["input_ids"][ex["loss_mask"] == 1])
    for turn in t.turns:
      assert turn.text in text
    assert not np.any(ex["loss_mask"][ex["input_ids"] == ids["image_token_id"]])
    assert "Observation" not in text and "Question" not in text


def test_batches_are_deterministic_resumable_and_host_disjoint(setup):
  trajs, tok, cfg = setup
  ds = loader.examples_dataset(trajs, tok, cfg)
  ids_of = lambda batch: [e["id"] for e in batch]

  it = loader.batches(ds, 3, list, seed=7)
  first = [ids_of(next(it)) for _ in range(5)]
  again = loader.batches(ds, 3, list, seed=7)
  assert [ids_of(next(again)) for _ in range(5)] == first
  assert [ids_of(next(loader.batches(ds, 3, list, seed=8)))] != first[:1]

  it = loader.batches(ds, 3, list, seed=7)
  next(it), next(it)
  state = it.get_state()
  rest = [ids_of(next(it)) for _ in range(3)]
  resumed = loader.batches(ds, 3, list, seed=7)
  resumed.set_state(state)
  assert [ids_of(next(resumed)) for _ in range(3)] == rest

  hosts = [loader.batches(ds, 5, list, seed=1, repeat=False, shuffle=False, process_index=i, process_count=2)
           for i in range(2)]
  seen = [set(e for b in h for e in ids_of(b)) for h in hosts]
  assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == len(trajs)


def test_too_long_examples_raise(setup):
  trajs, tok, cfg = setup
  with pytest.raises(loader.ExampleTooLong, match="max_tokens=10"):
    loader.trajectory_example(trajs[0], tok, loader.ExampleConfig(min_pixels=VIEW, max_pixels=VIEW, max_tokens=10))


def test_drop_long_filters_instead_of_raising(setup):
  trajs, tok, _ = setup
  full = loader.ExampleConfig(min_pixels=VIEW, max_pixels=VIEW)
  lengths = [len(loader.trajectory_example(t, tok, full)["input_ids"]) for t in trajs]
  limit = int(np.median(lengths))
  cfg = loader.ExampleConfig(min_pixels=VIEW, max_pixels=VIEW, max_tokens=limit)
  ds = loader.examples_dataset(trajs, tok, cfg, drop_long=True)
  kept = [e for b in loader.batches(ds, 2, list, seed=0, repeat=False, shuffle=False, drop_remainder=False)
          for e in b]
  assert len(kept) == sum(n <= limit for n in lengths) and 0 < len(kept) < len(trajs)


def test_example_length_equals_the_tokenized_length(setup):
  trajs, tok, cfg = setup
  for t in trajs:
    assert loader.example_length(t, tok, cfg) == len(loader.trajectory_example(t, tok, cfg)["input_ids"])


def test_length_grouped_order_is_a_permutation_of_similar_length_batches():
  rng = np.random.default_rng(0)
  lengths = rng.integers(50, 800, size=203)
  order = loader.length_grouped_order(lengths, 8, seed=3, epoch=0, window_batches=5)
  assert len(order) == 200 and len(set(order.tolist())) == 200  # each example at most once; tail dropped
  spread = np.ptp(lengths[order].reshape(-1, 8), axis=1).mean()
  random_spread = np.ptp(lengths[rng.permutation(200)].reshape(-1, 8), axis=1).mean()
  assert spread < random_spread / 3
  assert not np.array_equal(order, loader.length_grouped_order(lengths, 8, seed=3, epoch=1, window_batches=5))
  np.testing.assert_array_equal(order, loader.length_grouped_order(lengths, 8, seed=3, epoch=0, window_batches=5))


def test_length_grouped_batches_resume_and_split_global_batches_between_hosts(setup):
  trajs, tok, cfg = setup
  trajs = trajs * 2  # 20 examples
  ds = loader.examples_dataset(trajs, tok, cfg)
  lengths = [loader.example_length(t, tok, cfg) for t in trajs]
  lens_of = lambda batch: [len(e["input_ids"]) for e in batch]

  it = loader.length_grouped_batches(ds, lengths, 4, list, seed=1)
  next(it), next(it)
  state = it.get_state()
  rest = [lens_of(next(it)) for _ in range(6)]  # runs past the end of the first epoch
  resumed = loader.length_grouped_batches(ds, lengths, 4, list, seed=1)
  resumed.set_state(state)
  assert [lens_of(next(resumed)) for _ in range(6)] == rest

  # Two hosts of 2 rows each read exactly the rows of the one-host global batch of 4.
  one = loader.length_grouped_batches(ds, lengths, 4, list, seed=1)
  hosts = [loader.length_grouped_batches(ds, lengths, 2, list, seed=1, process_index=i, process_count=2)
           for i in range(2)]
  for _ in range(5):
    assert lens_of(next(one)) == lens_of(next(hosts[0])) + lens_of(next(hosts[1]))
  with pytest.raises(ValueError, match="lengths for"):
    loader.length_grouped_batches(ds, lengths[:-1], 4, list, seed=1)
