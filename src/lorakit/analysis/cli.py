"""`lorakit analyze ADAPTER [ADAPTER2] [--base MODEL] [--full-finetune CHECKPOINT]`.

The main `lorakit` CLI registers `add_arguments` / `run` as its `analyze` subcommand;
`python -m lorakit.analysis` runs the same thing standalone.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import LoraError
from .errors import AnalysisError
from .analyze import analyze_adapter
from .intruders import EPS, TOP_K, mitigate_adapter
from .report import to_json, to_markdown, write_report

HELP = ("spectra, subspace similarity and amplification of saved adapters (LoRA paper section 7); intruder "
        "dimensions")

DESCRIPTION = (
    "Analyse a saved LoRA adapter as in the LoRA paper, section 7: the singular-value spectrum of "
    "delta_weight (top-k energy, effective rank), the subspace similarity phi between two adapters "
    "(ADAPTER2, figures 3-4), the amplification of W0 directions (--base, table 7), and the spectrum "
    "of a full fine-tune's update W_ft - W0 (--full-finetune), and intruder dimensions (--intruders, "
    "Shuttleworth et al. 2024; --mitigate LAMBDA writes the mitigated adapter). Prints a Markdown summary (or JSON "
    "with --json); --out DIR also writes analysis.json, analysis.md and PNG plots."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `analyze` options to `parser` (and its description, if it has none)."""
    if not parser.description:
        parser.description = DESCRIPTION
    parser.add_argument("adapter", metavar="ADAPTER",
                        help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("adapter2", metavar="ADAPTER2", nargs="?", default=None,
                        help="second adapter (another rank or seed) for the subspace similarity")
    parser.add_argument("--base", metavar="MODEL", default=None,
                        help="base model folder (*.safetensors) or .safetensors file: W0 for the amplification "
                             "analysis")
    parser.add_argument("--full-finetune", metavar="CHECKPOINT", default=None,
                        help="fully fine-tuned weights (folder or .safetensors); the spectrum of W_ft - W0 "
                             "(needs --base)")
    parser.add_argument("--out", "-o", metavar="DIR", default=None,
                        help="write analysis.json, analysis.md and PNG plots here")
    parser.add_argument("--json", action="store_true", help="print JSON instead of Markdown on stdout")
    parser.add_argument("--no-plots", action="store_true", help="with --out: skip the PNG plots")
    parser.add_argument("--modules", metavar="REGEX", default=None,
                        help="only module paths matching this regex (re.search)")
    parser.add_argument("--rank", type=int, default=None, metavar="R",
                        help="number of singular directions in the amplification analysis (default: each module's r)")
    parser.add_argument("--random-trials", type=int, default=10, metavar="N",
                        help="random subspaces averaged (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random subspaces (default 0)")
    parser.add_argument("--max-heatmaps", type=int, default=16, metavar="N",
                        help="similarity heatmaps drawn at most (default 16)")
    parser.add_argument("--keep-singular-values", type=int, default=64, metavar="N",
                        help="singular values of W_ft - W0 stored per module (default 64; statistics use all)")
    parser.add_argument("--intruders", action="store_true",
                        help="count intruder dimensions of W0 + delta_weight (and W_ft) per module (needs --base; "
                             "Shuttleworth et al. 2024, arXiv:2410.21228)")
    parser.add_argument("--intruder-top-k", type=int, default=TOP_K, metavar="K",
                        help="singular vectors of the fine-tuned weight examined (default %(default)s, PEFT's)")
    parser.add_argument("--intruder-eps", type=float, default=EPS, metavar="EPS",
                        help="max |cosine| below which a singular vector is an intruder (default %(default)s, PEFT's)")
    parser.add_argument("--mitigate", type=float, default=None, metavar="LAMBDA",
                        help="write ADAPTER with its intruder directions scaled by LAMBDA (1: unchanged, 0: removed; "
                             "PEFT uses 0.75) to --mitigated-out (needs --base)")
    parser.add_argument("--mitigated-out", metavar="DIR", default=None, help="folder of the --mitigate adapter")


def run(args: argparse.Namespace) -> int:
    """Run the analysis; 0 on success, 2 (after one `error:` line on stderr) on bad input."""
    prog = getattr(args, "prog", None) or "lorakit analyze"
    try:
        if (args.mitigate is None) != (args.mitigated_out is None):
            raise AnalysisError("--mitigate LAMBDA and --mitigated-out DIR go together")
        result = analyze_adapter(
            args.adapter, args.adapter2, args.base, full_finetune=args.full_finetune, modules=args.modules,
            amplification_rank=args.rank, random_trials=args.random_trials, seed=args.seed,
            keep_singular_values=args.keep_singular_values, intruders=args.intruders or args.mitigate is not None,
            intruder_top_k=args.intruder_top_k, intruder_eps=args.intruder_eps,
        )
        if args.mitigate is not None:
            result["mitigation"] = mitigate_adapter(args.adapter, args.base, args.mitigated_out, args.mitigate,
                                                    args.intruder_top_k, args.intruder_eps, modules=args.modules)
            print(f"{prog}: wrote the adapter with {result['mitigation']['total']} intruder directions scaled by "
                  f"{args.mitigate:g} to {args.mitigated_out}", file=sys.stderr)
        if args.out:
            written = write_report(result, args.out, plots=not args.no_plots, max_heatmaps=args.max_heatmaps)
            print(f"{prog}: wrote {len(written)} files to {args.out}", file=sys.stderr)
        if args.json:
            sys.stdout.write(to_json(result))
        else:
            sys.stdout.write(to_markdown(result) + "\n")
    except LoraError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (`python -m lorakit.analysis`)."""
    parser = argparse.ArgumentParser(prog="python -m lorakit.analysis", description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.prog = parser.prog
    return run(args)
