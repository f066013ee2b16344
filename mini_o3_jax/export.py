"""Hugging Face export and import: train checkpoints <-> directories `transformers` and vLLM load.

Export (`export_checkpoint`, or `export_model` for a model in memory) writes everything a serving stack
reads from a Qwen2.5-VL directory, not only the weights (`model.hf.save_pretrained`):
  config.json, model*.safetensors (+ index)   the weights, hub layout
  generation_config.json                      eos = <|im_end|> and <|endoftext|>, pad, greedy by default
  preprocessor_config.json                    Qwen2VLImageProcessor: pixel budget, patch / merge sizes, CLIP mean/std
  tokenizer.json, tokenizer_config.json       the tokenizer, with the chat template inline and in
  chat_template.jinja, chat_template.json     the files transformers 5 / 4.x and processors read
The directory is staged under a temporary name and renamed into place (a crash never leaves half of
one); a `gs://...` destination is staged locally and then copied with `etils.epath`. An export runs in
one process: the weights are gathered to its host one tensor at a time.

Import (`import_pretrained`) turns a downloaded HF directory into an Orbax checkpoint written by the
train `Checkpointer` (step 0: params only, an empty optimizer state), so training starts from it with
`restore_params`; the HF side files (config, tokenizer, processor, generation config) are copied into
its `hf_assets/` folder, where a later export finds them again.

Where an export finds what is not in the checkpoint (explicit arguments win):
  1. `<checkpoint dir>/hf_assets/` (written by the import),
  2. the work directory of a `mini_o3_jax.main` run around `<workdir>/ckpt/<stage>`: its run
     `config.json` (the model: demo sizes, a preset or `init_from`; the pixel budget) and `tokenizer/`,
  3. for the tokenizer only, the real Qwen2.5 tokenizer (built offline) when the vocabulary fits it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
from typing import Any, Iterable

import jax
import ml_collections
import jax.numpy as jnp
import optax
import transformers
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mini_o3_jax.model.config import VLMConfig
from mini_o3_jax import run_config as run_config_lib
from mini_o3_jax.model.hf import (check_export_target, is_previous_export, load_pretrained, replace_dir,
                                  save_pretrained)
from mini_o3_jax.model.vlm import VLM
from mini_o3_jax.processing import image as image_lib
from mini_o3_jax.processing import tokenizer as tok_lib
from mini_o3_jax import sharding as sharding_lib
from mini_o3_jax.train import checkpoint as ckpt_lib
from mini_o3_jax.train import state as state_lib

log = logging.getLogger(__name__)

ASSETS_DIR = "hf_assets"
# Files of an HF model directory besides the weights that the import keeps (those present are copied).
HF_SIDE_FILES = ("config.json", "generation_config.json", "preprocessor_config.json",
                 "video_preprocessor_config.json", "processor_config.json", "chat_template.json",
                 "chat_template.jinja", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                 "special_tokens_map.json", "added_tokens.json")


# ------------------------------------------------------------------------------ side files

def generation_config_dict(config: VLMConfig, tokenizer) -> dict[str, Any]:
  """generation_config.json: stop at `<|im_end|>` (end of turn) or `<|endoftext|>`, greedy by default.

  Greedy is the neutral default for a converted research model; callers sample by passing their own
  settings to `generate`, as with any HF model.
  """
  ids = tok_lib.special_token_ids(tokenizer)
  eos = [ids["im_end_token_id"], ids["endoftext_token_id"]]
  if config.text.eos_token_id is not None and config.text.eos_token_id not in eos:
    eos.insert(0, config.text.eos_token_id)
  out = {"eos_token_id": eos, "pad_token_id": ids["pad_token_id"], "do_sample": False}
  if config.text.bos_token_id is not None:
    out["bos_token_id"] = config.text.bos_token_id
  return out


def _pixels_from_preprocessor(d: dict[str, Any]) -> tuple[int | None, int | None]:
  """(min_pixels, max_pixels) of a preprocessor_config.json in either the hub or the v5 layout."""
  size = d.get("size") or {}
  return (d.get("min_pixels", size.get("shortest_edge")), d.get("max_pixels", size.get("longest_edge")))


def _write_json(path: str, d: dict[str, Any]) -> None:
  with open(path, "w") as f:
    json.dump(d, f, indent=2, sort_keys=True)
    f.write("\n")


def save_tokenizer(tokenizer, path: str, model_type: str = "qwen2_5_vl") -> None:
  """The tokenizer plus Qwen2.5-VL's chat template, loadable by transformers 5 and 4.x.

  The template is always the official one: `processing.chat.tokenize_conversation`, which made every
  training example, renders exactly it. transformers 5 writes its added special tokens as a list
  under `extra_special_tokens`, which 4.x (and vLLM on 4.x) fails on; they are moved to the older
  `additional_special_tokens` key, which 5.x reads the same way. The caller's tokenizer is untouched.
  """
  tokenizer.save_pretrained(path)
  template = tok_lib.QWEN25VL_CHAT_TEMPLATE
  config_file = os.path.join(path, "tokenizer_config.json")
  with open(config_file) as f:
    tok_config = json.load(f)
  extra = tok_config.get("extra_special_tokens")
  if isinstance(extra, list):
    tok_config.pop("extra_special_tokens")
    tok_config["additional_special_tokens"] = extra
  tok_config["chat_template"] = template
  tok_config["processor_class"] = image_lib.PROCESSOR_CLASS[model_type]
  _write_json(config_file, tok_config)
  with open(os.path.join(path, "chat_template.jinja"), "w") as f:
    f.write(template)
  _write_json(os.path.join(path, "chat_template.json"), {"chat_template": template})


def write_hf_assets(path: str, config: VLMConfig, tokenizer, *, min_pixels: int, max_pixels: int,
                    generation: dict[str, Any] | None = None) -> None:
  """Everything but the weights: generation / preprocessor configs, tokenizer, chat template.

  Args:
    path: an existing local directory (normally the one `save_pretrained` wrote).
    config: the model config (token ids, patch sizes).
    tokenizer: the model's tokenizer; checked against the config's image token and vocabulary.
    min_pixels, max_pixels: the image budget the model was trained with.
    generation: generation_config.json contents to write instead of `generation_config_dict`'s.
  """
  check_tokenizer(tokenizer, config)
  transformers.GenerationConfig(**(generation if generation is not None
                                   else generation_config_dict(config, tokenizer))).save_pretrained(path)
  _write_json(os.path.join(path, "preprocessor_config.json"),
              image_lib.hf_preprocessor_config(config, min_pixels, max_pixels))
  save_tokenizer(tokenizer, path, config.model_type)


def check_tokenizer(tokenizer, config: VLMConfig) -> None:
  """Raises ValueError unless the tokenizer's vision tokens and size fit the model."""
  ids = tok_lib.special_token_ids(tokenizer)
  want = {"image_token_id": config.image_token_id, "vision_start_token_id": config.vision_start_token_id,
          "vision_end_token_id": config.vision_end_token_id}
  wrong = {k: (ids[k], v) for k, v in want.items() if ids[k] != v}
  if wrong:
    raise ValueError(f"the tokenizer does not belong to this model: (tokenizer id, model id) {wrong}")
  if len(tokenizer) > config.text.vocab_size:
    raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, the model's vocabulary only "
                     f"{config.text.vocab_size}")


# ------------------------------------------------------------------------------ writing a directory

def _is_remote(path: str) -> bool:
  return "://" in str(path)


def copy_tree(src: str, dst: str | epath.Path, names: Iterable[str] | None = None) -> list[str]:
  """Copies the files of local `src` (or only `names`) into `dst`, any epath-supported filesystem.

  Weights first and JSON last, so a reader of a remote copy sees config.json only once the
  safetensors are complete. Streams in 64 MiB pieces: a 5 GB shard never sits in memory.
  """
  names = sorted(os.listdir(src) if names is None else names, key=lambda n: (n.endswith(".json"), n))
  dst = epath.Path(dst)
  dst.mkdir(parents=True, exist_ok=True)
  for name in names:
    with open(os.path.join(src, name), "rb") as fin, (dst / name).open("wb") as fout:
      shutil.copyfileobj(fin, fout, 64 << 20)
  return names


def check_remote_target(out: str, overwrite: bool) -> None:
  """`check_export_target` for a gs:// (epath) directory, which an export copies files into."""
  p = epath.Path(out)
  if overwrite or not p.exists():
    return
  names = [c.name for c in p.iterdir()] if p.is_dir() else None
  if names is None or (names and not is_previous_export(names)):
    raise FileExistsError(f"{out} exists and is not an empty directory or a model export; refusing to "
                          "write into it (choose another path, or pass overwrite=True / --overwrite)")


def export_model(model: VLM, config: VLMConfig, tokenizer, out: str, *, dtype=None,
                 max_shard_bytes: int = 5 * 10**9, min_pixels: int = image_lib.DEFAULT_MIN_PIXELS,
                 max_pixels: int = image_lib.DEFAULT_MAX_PIXELS, generation: dict[str, Any] | None = None,
                 overwrite: bool = False) -> str:
  """A model in memory -> a complete HF Qwen2.5-VL directory at `out` (local path or gs://). Returns `out`.

  `out` must be new, empty or a previous export; `overwrite=True` replaces whatever it is. The export
  is staged beside `out` and swapped in whole, so a failed export leaves the old one intact.

  Raises:
    FileExistsError: `out` holds something other than a previous export.
  """
  check_tokenizer(tokenizer, config)
  remote = _is_remote(out)
  if remote:
    check_remote_target(out, overwrite)
  else:
    check_export_target(out, overwrite)
  parent = tempfile.gettempdir() if remote else os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp_export_", dir=parent)
  try:
    staged = os.path.join(tmp, "model")
    save_pretrained(model, config, staged, dtype=dtype, max_shard_bytes=max_shard_bytes)
    write_hf_assets(staged, config, tokenizer, min_pixels=min_pixels, max_pixels=max_pixels, generation=generation)
    if remote:
      copy_tree(staged, out)
    else:
      replace_dir(staged, os.path.abspath(out))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out


# ------------------------------------------------------------------------------ finding the side files

@dataclasses.dataclass(frozen=True)
class ExportSources:
  """What an export needs besides the weights, and where each piece came from (for the log)."""
  config: VLMConfig
  tokenizer: Any
  min_pixels: int
  max_pixels: int
  generation: dict[str, Any] | None = None
  origin: dict[str, str] = dataclasses.field(default_factory=dict)


def _read_json(path: epath.Path) -> dict[str, Any]:
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from e


def _local_dir(path: str | epath.Path) -> str:
  """A local directory with the files of `path` (itself if local; small side files only if remote)."""
  if not _is_remote(str(path)):
    return os.fspath(path)
  local = tempfile.mkdtemp(prefix="mini_o3_assets_")
  for child in epath.Path(path).iterdir():
    if child.is_file():
      (epath.Path(local) / child.name).write_bytes(child.read_bytes())
  return local


def _model_config_file(path: str) -> epath.Path:
  p = epath.Path(path)
  p = p / "config.json" if p.is_dir() else p
  if not p.exists():
    raise FileNotFoundError(f"model config not found: {p}")
  return p


def _demo_workdir(directory: str) -> epath.Path | None:
  """`<workdir>` for a checkpoint directory `<workdir>/ckpt/<stage>` whose config.json is a run config
  (`mini_o3_jax.main` writes it), else None."""
  d = epath.Path(directory)
  if d.parent.name != "ckpt":
    return None
  workdir = d.parent.parent
  run_config = workdir / "config.json"
  if not run_config.exists():
    return None
  doc = _read_json(run_config)
  return workdir if isinstance(doc.get("model"), dict) and "tokenizer" in doc else None


def _tokenizer_dir(tokenizer_path: str | None, assets: epath.Path | None,
                   workdir: epath.Path | None) -> str | None:
  """The tokenizer directory to use: the argument, hf_assets/, the work dir's tokenizer/, or None (Qwen's)."""
  if tokenizer_path is not None:
    return tokenizer_path
  for d in (assets, None if workdir is None else workdir / "tokenizer"):
    if d is not None and (d / "tokenizer.json").exists():
      return os.fspath(d)
  return None


def _saved_pixel_budget(assets: epath.Path | None, run_config) -> tuple[int | None, int | None, str | None]:
  """(min_pixels, max_pixels, source file) recorded by an import or a run, or Nones."""
  if assets is not None and (assets / "preprocessor_config.json").exists():
    file = assets / "preprocessor_config.json"
    return (*_pixels_from_preprocessor(_read_json(file)), os.fspath(file))
  if run_config is not None:
    if run_config_lib.sets_pixel_budget(run_config):
      return (*run_config_lib.pixel_budget(run_config), "run config")
  return None, None, None


def find_sources(checkpoint: str, *, config_path: str | None = None, tokenizer_path: str | None = None,
                 min_pixels: int | None = None, max_pixels: int | None = None) -> ExportSources:
  """The model config, tokenizer, pixel budget and generation config for exporting `checkpoint`.

  Explicit arguments first, then the checkpoint's `hf_assets/`, then the run's work directory, then
  defaults (the real Qwen tokenizer, `preprocess_image`'s pixel budget); see the module docstring.

  Raises:
    FileNotFoundError: the checkpoint is missing, or no model config can be found.
  """
  directory, _ = ckpt_lib.resolve_checkpoint(checkpoint)
  assets = epath.Path(directory) / ASSETS_DIR
  assets = assets if assets.is_dir() else None
  workdir = _demo_workdir(directory)
  run_config = None
  if workdir is not None:
    run_config = ml_collections.ConfigDict(_read_json(workdir / "config.json"))

  # Where the model config comes from, decided (and a missing one reported) before any slow loading.
  if config_path is not None:
    config_file = _model_config_file(config_path)
  elif assets is not None and (assets / "config.json").exists():
    config_file = assets / "config.json"
  elif run_config is not None:
    config_file = None  # derived below from the run config and the tokenizer's ids
  else:
    raise FileNotFoundError(
        f"no model config for {checkpoint}: pass --config path/to/config.json (an HF Qwen2.5-VL config.json, "
        f"e.g. the one `import_hf` wrote to {ASSETS_DIR}/), or point at <workdir>/ckpt/<stage> of a run")

  tok_dir = _tokenizer_dir(tokenizer_path, assets, workdir)
  tokenizer = tok_lib.load_tokenizer(None if tok_dir is None else _local_dir(tok_dir))
  origin = {"tokenizer": tok_dir or "the real Qwen2.5 tokenizer (built offline)"}
  if config_file is not None:
    config = VLMConfig.from_hf_dict(_read_json(config_file))
    origin["config"] = os.fspath(config_file)
  else:
    config = run_config_lib.model_config(run_config, tokenizer)
    origin["config"] = os.fspath(workdir / "config.json")

  generation = None
  if assets is not None and (assets / "generation_config.json").exists():
    generation = _read_json(assets / "generation_config.json")
    origin["generation"] = os.fspath(assets / "generation_config.json")
  saved_min, saved_max, pixels_from = _saved_pixel_budget(assets, run_config)
  if min_pixels is not None or max_pixels is not None:
    pixels_from = "arguments"
  origin["pixels"] = pixels_from or "defaults"
  min_pixels = min_pixels or saved_min or image_lib.DEFAULT_MIN_PIXELS
  max_pixels = max_pixels or saved_max or image_lib.DEFAULT_MAX_PIXELS
  return ExportSources(config=config, tokenizer=tokenizer, min_pixels=int(min_pixels), max_pixels=int(max_pixels),
                       generation=generation, origin=origin)


def export_checkpoint(checkpoint: str, out: str, *, config_path: str | None = None,
                      tokenizer_path: str | None = None, dtype=None, max_shard_bytes: int = 5 * 10**9,
                      min_pixels: int | None = None, max_pixels: int | None = None, mesh=None,
                      overwrite: bool = False) -> dict[str, Any]:
  """An Orbax train checkpoint -> a complete HF directory at `out` (see `export_model`). Returns a summary.

  `dtype` (e.g. jnp.bfloat16) is the dtype of the written weights; the params are read from the
  checkpoint in it directly, so a bf16 export of a 7B model never holds an fp32 copy.
  """
  (check_remote_target if _is_remote(out) else check_export_target)(out, overwrite)  # before the slow part
  sources = find_sources(checkpoint, config_path=config_path, tokenizer_path=tokenizer_path,
                         min_pixels=min_pixels, max_pixels=max_pixels)
  model, step = ckpt_lib.restore_model(checkpoint, sources.config, mesh=mesh, dtype=dtype)
  export_model(model, model.config, sources.tokenizer, out, dtype=dtype, max_shard_bytes=max_shard_bytes,
               min_pixels=sources.min_pixels, max_pixels=sources.max_pixels, generation=sources.generation,
               overwrite=overwrite)
  return {"checkpoint": checkpoint, "step": step, "out": out, "dtype": model.config.param_dtype,
          "min_pixels": sources.min_pixels, "max_pixels": sources.max_pixels, "sources": sources.origin}


# ------------------------------------------------------------------------------ import

def import_pretrained(hf_dir: str, out: str, *, dtype=jnp.float32, mesh=None) -> dict[str, Any]:
  """A downloaded HF Qwen2.5-VL directory -> an Orbax params checkpoint (step 0) at `out`.

  The checkpoint is the train `Checkpointer`'s layout with an empty optimizer state, read back with
  `train.checkpoint.restore_params(out, config)`; `out/hf_assets/` receives the HF side files (see `HF_SIDE_FILES`).

  Raises:
    FileNotFoundError: `hf_dir` or its config.json / weights are missing.
    FileExistsError: `out` already holds a checkpoint.
  """
  if not os.path.isdir(hf_dir):
    raise FileNotFoundError(f"HF model directory not found: {hf_dir}")
  if not os.path.exists(os.path.join(hf_dir, "config.json")):
    raise FileNotFoundError(f"no config.json in {hf_dir}: not an HF model directory")
  out_path = epath.Path(out)
  if out_path.is_dir() and any(c.name.isdigit() for c in out_path.iterdir()):
    raise FileExistsError(f"{out} already holds a checkpoint; choose an empty directory")
  mesh = mesh if mesh is not None else sharding_lib.make_mesh((1, -1, 1))
  model, config = load_pretrained(hf_dir, dtype=dtype, mesh=mesh)
  graphdef, params = nnx.split(model, nnx.Param)
  replicated = NamedSharding(mesh, P())
  state = state_lib.TrainState(graphdef=graphdef, params=nnx.to_pure_dict(params), opt_state=optax.EmptyState(),
                               step=jax.device_put(jnp.zeros((), jnp.int32), replicated),
                               rng=jax.device_put(jax.random.PRNGKey(0), replicated))
  with ckpt_lib.Checkpointer(ckpt_lib.CheckpointConfig(out, async_save=False, max_to_keep=None)) as ckpt:
    ckpt.save(state, {"imported_from": os.path.abspath(hf_dir)}, step=0)
  present = [n for n in HF_SIDE_FILES if os.path.isfile(os.path.join(hf_dir, n))]
  if jax.process_index() == 0:  # every process of a multi-host run saves the arrays; one copies files
    copy_tree(hf_dir, out_path / ASSETS_DIR, present)
  if "tokenizer.json" not in present and "vocab.json" not in present:
    log.warning("%s has no tokenizer files; an export will use the real Qwen2.5 tokenizer", hf_dir)
  return {"hf_dir": hf_dir, "out": out, "step": 0, "dtype": config.param_dtype,
          "params": state_lib.count_params(state.params), "copied": present}


# ------------------------------------------------------------------------------ command lines

def run_cli(tool: str, action) -> int:
  """What tools/export_hf.py and tools/import_hf.py share: quiet library logs, `action()`'s summary as
  JSON on stdout, and a one-line error with exit code 2 for bad paths or settings."""
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  for name in ("absl", "jax", "orbax"):
    logging.getLogger(name).setLevel(logging.WARNING)
  try:
    summary = action()
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    print(f"{tool}: error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(summary, indent=2))
  return 0
