"""The analyses of the LoRA paper, section 7 (Hu et al. 2021, arXiv:2106.09685), for saved adapters.

    from lorakit.analysis import analyze_adapter, write_report
    result = analyze_adapter("out/r8", other="out/r64", base="path/to/base_model")
    write_report(result, "out/analysis")     # analysis.json, analysis.md, PNG plots

Matrix-level API (float64; shapes in each docstring):

- `spectrum(delta)`: singular values, top-k energy, effective ranks (§4.2, §7);
- `lowrank_svd(B, A, scaling)`: exact thin SVD of `scaling * B @ A` without forming it;
- `subspace_similarity(A1, A2)`: `phi(A1, A2, i, j)` of §7.2 for all i, j;
- `amplification(delta, W0, r)`: `||delta||_F / ||U^T W0 V^T||_F` and the table-7 baselines (§7.3);
- `intruder_dimensions(W0, W)`: singular vectors of W unlike every one of W0 (Shuttleworth et al. 2024,
  arXiv:2410.21228); `mitigate_intruders`, `mitigate_factors`, `mitigate_adapter` scale them by lambda.

Command line: `lorakit analyze ADAPTER [ADAPTER2] [--base MODEL] [--full-finetune CKPT]`
(or `python -m lorakit.analysis ...`). See docs/analysis.md.
"""

from .amplification import amplification, amplification_from_svd
from .analyze import DEFINITIONS, analyze_adapter
from .errors import AnalysisError, BaseModelError, NoCommonModulesError
from .intruders import (intruder_correction, intruder_dimensions, mitigate_adapter, mitigate_factors,
                        mitigate_intruders, pretrained_basis)
from .linalg import lowrank_svd
from .report import make_plots, to_json, to_markdown, write_report
from .similarity import grassmann_similarity, random_baseline, singular_basis, similarity_summary, subspace_similarity
from .spectrum import effective_rank, energy_rank, spectrum, spectrum_from_singular_values
from .weights import AdapterFactors, ModuleFactors, WeightSource, load_factors

__all__ = [
    "analyze_adapter", "DEFINITIONS",
    "spectrum", "spectrum_from_singular_values", "effective_rank", "energy_rank", "lowrank_svd",
    "subspace_similarity", "grassmann_similarity", "singular_basis", "random_baseline", "similarity_summary",
    "amplification", "amplification_from_svd",
    "intruder_dimensions", "intruder_correction", "pretrained_basis", "mitigate_intruders", "mitigate_factors",
    "mitigate_adapter",
    "to_json", "to_markdown", "write_report", "make_plots",
    "load_factors", "WeightSource", "AdapterFactors", "ModuleFactors",
    "AnalysisError", "NoCommonModulesError", "BaseModelError",
]
