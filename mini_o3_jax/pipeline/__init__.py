"""The stages `main` can run, by name."""

from mini_o3_jax.pipeline.coldstart_stage import run_coldstart
from mini_o3_jax.pipeline.eval_stages import run_eval, run_export, run_report
from mini_o3_jax.pipeline.pretrain_stage import run_export_base, run_pretrain, run_pretrain_vision
from mini_o3_jax.pipeline.rl_stages import run_rl, run_rl_no_coldstart, run_rl_no_mask
from mini_o3_jax.pipeline.smoke import run_smoke
from mini_o3_jax.pipeline.train_stages import run_data, run_sft

STAGES = {
    "smoke": run_smoke,
    "pretrain_vision": run_pretrain_vision,
    "pretrain": run_pretrain,
    "export_base": run_export_base,
    "data": run_data,
    "sft": run_sft,
    "coldstart": run_coldstart,
    "rl": run_rl,
    "rl_no_mask": run_rl_no_mask,
    "rl_no_coldstart": run_rl_no_coldstart,
    "eval": run_eval,
    "report": run_report,
    "export": run_export,
}
