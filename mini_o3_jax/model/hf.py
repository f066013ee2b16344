"""Hugging Face checkpoints <-> our NNX model (Qwen2.5-VL and Qwen3-VL).

`load_pretrained` reads `config.json` and safetensors (one file or a sharded index), one tensor slice
at a time straight into (optionally sharded) device arrays: a stacked parameter's shard reads only its
own layers and rows, so a 7B checkpoint never exists twice in host memory. `save_pretrained` writes the
hub layout that `transformers` loads: Qwen2.5-VL's `model.layers.{i}...`, `visual.blocks.{i}...`;
Qwen3-VL's `model.language_model.layers.{i}...`, `model.visual.blocks.{i}...`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Any, Callable

import huggingface_hub
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from huggingface_hub import constants as hf_constants
from huggingface_hub import errors as hf_errors
from safetensors import safe_open
from safetensors.numpy import save_file
import transformers

from mini_o3_jax.model.config import VLMConfig
from mini_o3_jax.model.vlm import VLM
from mini_o3_jax.processing import image as image_lib
from mini_o3_jax import sharding as shard_lib

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"

# What an exported model directory holds (ours, transformers' and tokenizers' file names). A directory
# holding only these (config.json among them) is a previous export, which a new one may replace.
EXPORT_FILE = re.compile(
    r"(config|generation_config|preprocessor_config|tokenizer|tokenizer_config|special_tokens_map|"
    r"added_tokens|vocab|chat_template|skills|skills_check|training_summary)\.json|"
    r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|merges\.txt|chat_template\.jinja")

_TEXT_LAYER = {name: "self_attn." + name for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")}
_VISION_BLOCK = {"qkv": "attn.qkv", "proj": "attn.proj"}
_MERGER = {"mlp_0": "mlp.0", "mlp_2": "mlp.2"}
_LEAF = {"kernel": "weight", "embedding": "weight", "weight": "weight", "bias": "bias"}


def hf_name(path: tuple[str, ...], model_type: str = "qwen2_5_vl") -> tuple[str, str, bool]:
  """Our parameter path -> (HF key template with `{i}` for stacked layers, kind, stacked).

  kind: "linear" (our [in, out] is torch's [out, in] transposed), "conv" (the patch embedding, a Conv3d
  whose kernel covers the whole patch), or "plain".
  """
  *mods, leaf = path
  if mods == ["visual"] and leaf == "pos_embed":  # Qwen3-VL's learned table, a Param of the tower itself
    mods, leaf = ["visual", "pos_embed"], "weight"
  kind = "linear" if leaf == "kernel" else "plain"
  stacked = False
  if mods[:2] == ["model", "layers"]:
    mods = ["model", "layers", "{i}", _TEXT_LAYER.get(mods[2], mods[2]), *mods[3:]]
    stacked = True
  elif mods[:2] in (["visual", "blocks"], ["visual", "deepstack_merger_list"]):
    mods = [*mods[:2], "{i}", _VISION_BLOCK.get(mods[2], mods[2]), *mods[3:]]
    stacked = True
  elif mods[:2] == ["visual", "merger"] and model_type == "qwen2_5_vl":
    mods = ["visual", "merger", *[_MERGER.get(m, m) for m in mods[2:]]]
  elif mods == ["visual", "patch_embed"]:
    mods, kind = ["visual", "patch_embed", "proj"], "conv" if leaf == "kernel" else "plain"
  if model_type == "qwen3_vl" and mods[0] in ("model", "visual"):
    mods = ["model", "language_model" if mods[0] == "model" else "visual", *mods[1:]]
  return ".".join([*mods, _LEAF[leaf]]), kind, stacked


def _param_paths(state: nnx.State) -> dict[tuple[str, ...], Any]:
  flat = {}
  for path, var in nnx.to_flat_state(state):
    flat[tuple(str(p) for p in path)] = var
  return flat


# ------------------------------------------------------------------------------ reading

class _Tensors:
  """Lazy access to the tensors of a safetensors checkpoint directory (single file or sharded)."""

  def __init__(self, path: str):
    index = os.path.join(path, SAFE_INDEX)
    if os.path.exists(index):
      try:
        with open(index) as f:
          weight_map = json.load(f).get("weight_map")
      except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{index} is not a JSON object: {e}") from e
      if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index} has no \"weight_map\" of tensor name -> shard file")
      files = {k: os.path.join(path, v) for k, v in weight_map.items()}
    else:
      single = os.path.join(path, SAFE_SINGLE)
      if not os.path.exists(single):
        raise FileNotFoundError(f"no {SAFE_SINGLE} or {SAFE_INDEX} in {path!r}")
      files = {k: single for k in self._open(single).keys()}
    missing_files = sorted({f for f in files.values() if not os.path.exists(f)})
    if missing_files:
      raise FileNotFoundError(f"checkpoint index names missing files: {missing_files[:5]}")
    self.files = files
    self._handles: dict[str, Any] = {}

  @staticmethod
  def _open(file: str):
    try:
      return safe_open(file, framework="numpy")
    except Exception as e:  # safetensors raises its own SafetensorError for truncated or foreign files
      raise ValueError(f"cannot read safetensors file {file}: {e} (truncated or not safetensors?)") from e

  def keys(self) -> set[str]:
    return set(self.files)

  def _handle(self, key: str):
    file = self.files[key]
    if file not in self._handles:
      self._handles[file] = self._open(file)
    return self._handles[file]

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._handle(key).get_slice(key).get_shape())

  def read(self, key: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
    sl = self._handle(key).get_slice(key)
    return sl[index] if index else sl[:]

  def close(self):
    self._handles.clear()


def _our_shape_from_hf(kind: str, hf_shape: tuple[int, ...]) -> tuple[int, ...]:
  if kind == "linear":
    return hf_shape[::-1]
  if kind == "conv":
    return (int(np.prod(hf_shape[1:])), hf_shape[0])
  return hf_shape


def _read_block(tensors: _Tensors, key: str, kind: str, index: tuple[slice, ...]) -> np.ndarray:
  """Reads our-layout region `index` of the tensor `key`, touching only that region where possible."""
  if kind == "linear":
    return tensors.read(key, (index[1], index[0])).T
  if kind == "conv":
    full = tensors.read(key)
    return full.reshape(full.shape[0], -1).T[index]
  return tensors.read(key, index)


def _normalize_index(index, shape) -> tuple[slice, ...]:
  return tuple(slice(*s.indices(n)) for s, n in zip(index, shape))


def resolve_checkpoint(path: str, cache_dir: str | None = None) -> str:
  """A local directory as is; a hub id ("org/name") as its snapshot in the local Hugging Face cache
  (`cache_dir`, default the hub's)."""
  if os.path.exists(path) or path.count("/") != 1 or path.startswith((".", "/")):
    return path
  try:
    return huggingface_hub.snapshot_download(path, cache_dir=cache_dir, local_files_only=True)
  except hf_errors.LocalEntryNotFoundError as e:
    raise FileNotFoundError(f"{path!r} is neither a local directory nor a model in the local Hugging Face cache "
                            f"({cache_dir or hf_constants.HF_HUB_CACHE}); this code never downloads: fetch it "
                            f"first with `huggingface-cli download {path}`") from e


def load_pretrained(path: str, dtype=jnp.float32, *, param_dtype=None, mesh=None, rules=None,
                    **config_overrides) -> tuple[VLM, VLMConfig]:
  """HF safetensors directory -> (VLM, config); the family comes from config.json's `model_type`.

  Args:
    path: a directory with `config.json` and `model.safetensors` or `model.safetensors.index.json`, or a
      hub id ("Qwen/Qwen2.5-VL-7B-Instruct") already in the local Hugging Face cache (never downloaded).
    dtype: compute dtype (and parameter dtype unless `param_dtype` is given).
    mesh: optional `jax.sharding.Mesh`; parameters are then created sharded by the logical rules.
    rules: logical-axis rules (default `mini_o3_jax.sharding.DEFAULT_RULES`).
  """
  path = resolve_checkpoint(path)

  dtype_name = jnp.dtype(dtype).name
  config = VLMConfig.from_pretrained(path, dtype=dtype_name,
                                          param_dtype=jnp.dtype(param_dtype or dtype).name, **config_overrides)
  abstract = nnx.eval_shape(lambda: VLM(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  if mesh is not None:
    shardings = shard_lib.state_shardings(state, mesh, rules or shard_lib.DEFAULT_RULES)
  else:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  flat_shardings = dict(_param_paths(shardings))
  tensors = _Tensors(path)
  available = tensors.keys()
  used: set[str] = set()
  errors: list[str] = []
  flat = _param_paths(state)
  values = {}
  for p, var in flat.items():
    template, kind, stacked = hf_name(p, config.model_type)
    shape, pdtype = var.get_value().shape, var.get_value().dtype
    n_layers = shape[0] if stacked else 1
    keys = [template.format(i=i) for i in range(n_layers)]
    missing = [k for k in keys if k not in available]
    used.update(k for k in keys if k in available)  # present under its name: never "unexpected"
    if missing:
      errors.append(f"missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more layers)" if len(missing) > 1 else ""))
      continue
    want = shape[1:] if stacked else shape
    bad = [(k, tensors.shape(k)) for k in keys if _our_shape_from_hf(kind, tensors.shape(k)) != tuple(want)]
    if bad:
      errors.append(f"tensor {bad[0][0]} has shape {bad[0][1]}, expected {_expected_hf_shape(kind, want)}")
      continue

    def callback(index, keys=keys, kind=kind, stacked=stacked, shape=shape, pdtype=pdtype):
      index = _normalize_index(index, shape)
      if not stacked:
        return _read_block(tensors, keys[0], kind, index).astype(pdtype)
      layers = range(*index[0].indices(shape[0]))
      return np.stack([_read_block(tensors, keys[i], kind, index[1:]) for i in layers]).astype(pdtype)

    values[p] = (shape, callback)
  if config.tie_word_embeddings:
    used.add("lm_head.weight")  # some tied checkpoints still carry a copy; it is the embedding
  unexpected = sorted(available - used)
  if unexpected:
    errors.append(f"unexpected tensors: {unexpected[:5]}" + (f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else ""))
  if errors:
    tensors.close()
    raise ValueError(f"checkpoint {path!r} does not match the config:\n  " + "\n  ".join(errors))
  for p, (shape, callback) in values.items():
    flat[p].set_value(jax.make_array_from_callback(shape, flat_shardings[p], callback))
  tensors.close()
  return nnx.merge(graphdef, state), config


def _expected_hf_shape(kind: str, ours: tuple[int, ...]) -> tuple[int, ...]:
  if kind == "linear":
    return tuple(ours[::-1])
  if kind == "conv":
    return (ours[1], ours[0])
  return tuple(ours)


# ------------------------------------------------------------------------------ writing

def hf_tensors(model: VLM, dtype=None) -> dict[str, tuple[int, Callable[[], np.ndarray]]]:
  """HF key -> (size in bytes, a thunk producing that tensor on the host), so callers can stream them."""
  cfg = model.config
  v = cfg.vision
  out: dict[str, tuple[int, Callable[[], np.ndarray]]] = {}
  for p, var in _param_paths(nnx.state(model, nnx.Param)).items():
    template, kind, stacked = hf_name(p, cfg.model_type)
    value = var.get_value()
    itemsize = np.dtype(dtype).itemsize if dtype is not None else value.dtype.itemsize

    def convert(x: np.ndarray, kind=kind) -> np.ndarray:
      if kind == "linear":
        x = x.T
      elif kind == "conv":
        x = x.T.reshape(v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
      x = np.ascontiguousarray(x)
      return x.astype(dtype) if dtype is not None else x

    if stacked:
      nbytes = int(np.prod(value.shape[1:])) * itemsize
      for i in range(value.shape[0]):
        out[template.format(i=i)] = (nbytes, lambda value=value, i=i, convert=convert:
                                     convert(np.asarray(jax.device_get(value[i]))))
    else:
      nbytes = int(np.prod(value.shape)) * itemsize
      out[template] = (nbytes, lambda value=value, convert=convert: convert(np.asarray(jax.device_get(value))))
  return out


def is_previous_export(names) -> bool:
  """Whether directory entries `names` are those of a model export (config.json and export files only)."""
  names = list(names)
  return "config.json" in names and all(EXPORT_FILE.fullmatch(n) for n in names)


def check_export_target(path: str, overwrite: bool = False) -> None:
  """Refuses to write a model directory where it would replace something the user made.

  `path` may be absent, an empty directory, or a previous export (see `is_previous_export`); anything
  else (a file, a folder of notes, a work directory) needs `overwrite=True`.

  Raises:
    FileExistsError: naming `path` and what it holds.
  """
  if overwrite or not os.path.lexists(path):
    return
  if not os.path.isdir(path) or os.path.islink(path):
    raise FileExistsError(f"{path} exists and is not a directory; refusing to replace it with a model "
                          "export (choose another path, or pass overwrite=True / --overwrite)")
  names = os.listdir(path)
  if names and not is_previous_export(names):
    foreign = sorted(n for n in names if not EXPORT_FILE.fullmatch(n))[:5] or ["no config.json"]
    raise FileExistsError(f"{path} is not empty and is not a model export (it holds {', '.join(foreign)}); "
                          "refusing to replace it (choose an empty or new directory, or pass "
                          "overwrite=True / --overwrite)")


def replace_dir(staged: str, path: str) -> None:
  """Renames the finished directory `staged` onto `path` (same filesystem), replacing what was there.

  The old directory is moved aside first and removed only once the new one is in place, so a failure
  leaves one of the two complete.
  """
  if os.path.lexists(path):
    old = tempfile.mkdtemp(prefix=".tmp_old_", dir=os.path.dirname(os.path.abspath(path)))
    os.rename(path, os.path.join(old, "x"))
    try:
      os.rename(staged, path)
    except BaseException:
      os.rename(os.path.join(old, "x"), path)
      raise
    shutil.rmtree(old)
  else:
    os.rename(staged, path)


def save_pretrained(model: VLM, config: VLMConfig | None, path: str, *, dtype=None,
                    max_shard_bytes: int = 5 * 1024**3, overwrite: bool = False,
                    min_pixels: int = image_lib.DEFAULT_MIN_PIXELS,
                    max_pixels: int = image_lib.DEFAULT_MAX_PIXELS) -> None:
  """Writes a directory transformers' `from_pretrained` / `generate` and `vllm serve` can use, atomically:
  `config.json` (transformers' config class), `generation_config.json` (`GenerationConfig` from the
  config's token ids), `preprocessor_config.json` (the image processor at `min_pixels` / `max_pixels`)
  and safetensors (sharded with an index above `max_shard_bytes`). The tokenizer is not the model's to
  write: `export.export_model` adds it and the chat template.

  The directory is written under a temporary name beside `path` and renamed into place, so a crash
  never leaves a half-written checkpoint at `path`. `path` must be new, empty or a previous export
  (`check_export_target`); `overwrite=True` replaces whatever it is.
  """
  check_export_target(path, overwrite)
  config = config or model.config
  if dtype is not None:
    config = config.replace(param_dtype=jnp.dtype(dtype).name)
  np_dtype = None if dtype is None else np.dtype(jnp.dtype(dtype))
  parent = os.path.dirname(os.path.abspath(path)) or "."
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp_save_", dir=parent)
  try:
    config.save_pretrained(tmp)
    t = config.text
    transformers.GenerationConfig(bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id,
                                  pad_token_id=t.pad_token_id, do_sample=False).save_pretrained(tmp)
    with open(os.path.join(tmp, "preprocessor_config.json"), "w") as f:
      json.dump(image_lib.hf_preprocessor_config(config, min_pixels, max_pixels), f, indent=2, sort_keys=True)
    thunks = hf_tensors(model, np_dtype)
    # Plan shards from sizes alone, then materialise one shard at a time.
    plan: list[list[str]] = [[]]
    size = 0
    for key in sorted(thunks):
      nbytes = thunks[key][0]
      if plan[-1] and size + nbytes > max_shard_bytes:
        plan.append([])
        size = 0
      plan[-1].append(key)
      size += nbytes
    meta = {"format": "pt"}  # transformers insists on this metadata
    if len(plan) == 1:
      save_file({k: thunks[k][1]() for k in plan[0]}, os.path.join(tmp, SAFE_SINGLE), metadata=meta)
    else:
      weight_map = {}
      for n, keys in enumerate(plan, 1):
        name = f"model-{n:05d}-of-{len(plan):05d}.safetensors"
        save_file({k: thunks[k][1]() for k in keys}, os.path.join(tmp, name), metadata=meta)
        weight_map.update({k: name for k in keys})
      total = sum(t[0] for t in thunks.values())
      with open(os.path.join(tmp, SAFE_INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    replace_dir(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
