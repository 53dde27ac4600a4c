"""Experiments that re-measure the LoRA paper's claims (Hu et al. 2021, arXiv:2106.09685) on the
built-in model and data, each writing `report.md`, `results.json` and PNG figures:

- `rank_sweep`: r in {1, 2, 4, 8, 64} on q/v; accuracy, delta_weight spectra, subspace
  similarity phi between ranks, amplification (paper table 6, figure 3, table 7);
- `which_weights`: q, k, v, o, q+v, q+k+v+o, all-linear at a fixed LoRA parameter budget (table 5);
- `full_vs_lora`: LoRA vs full fine-tuning of the MiniLM encoder recipe; spectrum of W_ft - W0;
- `variants`: LoRA, rsLoRA, DoRA, LoRA+, PiSSA on the default recipe (docs/variants.md);
- `lr_sweep`: learning-rate sweep, full fine-tuning vs LoRA r=1..64 and attention-only (LoRA Without Regret).

Command line: `lorakit experiment NAME [--out DIR] [--quick] ...` (`cli.py`); the runs go
through `runner.Session`, which trains each arm as `lorakit train` does.
"""

from .runner import Arm, RunResult, Session, paired, standard_error

__all__ = ["Arm", "RunResult", "Session", "paired", "standard_error"]
