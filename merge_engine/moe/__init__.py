"""mergekit-moe: a mixture-of-experts model (Mixtral, Qwen2-MoE, Qwen3-MoE) assembled from dense experts sharing a base.

config.py (the YAML schema) -> layouts.py (the output's tensors and where each comes from) -> router.py (the
router rows of each gate mode) -> build.py (plan, gates, the streamed writer job) -> cli.py (the command)."""

from .build import MoEPlan, plan_moe, run_moe
from .config import GATE_MODES, Expert, MoEConfig, load_moe_config, parse_moe_config

__all__ = ["GATE_MODES", "Expert", "MoEConfig", "MoEPlan", "load_moe_config", "parse_moe_config", "plan_moe",
           "run_moe"]
