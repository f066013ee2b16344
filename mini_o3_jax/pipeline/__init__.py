"""The stages `main` can run, by name."""

from mini_o3_jax.pipeline.smoke import run_smoke

STAGES = {
    "smoke": run_smoke,
}
