"""`VerifyReport.to_text()`: the whole verification on one screen."""

from __future__ import annotations

import statistics


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _coverage_row(c, label: str | None = None) -> str:
    return (f"  {label or c.kind:<11} {c.covered_modules:>4}/{c.modules:<4} modules  "
            f"{_count(c.covered_params):>7}/{_count(c.params):<7} params  {100 * c.share:5.1f}%")


def _coverage_lines(report) -> list[str]:
    rows = [c for k, c in report.coverage.items() if k != "all" and c.modules]
    lines = ["coverage of the linear parameters (adapted / all):"] + [_coverage_row(c) for c in rows]
    total = report.coverage.get("all")
    if total is not None and total.params:
        tied = sum(c.modules for c in rows) - total.modules
        lines.append(_coverage_row(total, "all") + (f"  (tied weights once: {tied})" if tied else ""))
    skipped = [c.kind for c in rows if c.covered_params == 0]
    if skipped and total is not None and total.covered_params:
        lines.append(f"  not adapted at all: {', '.join(skipped)}")
    return lines


def _delta_lines(report) -> list[str]:
    if not report.deltas:
        return []
    norms = [d.rel_norm for d in report.deltas]
    worst = min(report.deltas, key=lambda d: d.rel_norm)
    line = (f"update size ||W - W0|| / ||W0|| over {len(norms)} modules: min {min(norms):.2g} ({worst.path}), "
            f"median {statistics.median(norms):.2g}, max {max(norms):.2g}")
    zero = report.zero_b
    return [line, f"modules whose B is all zero: {len(zero)}" + (f" (first: {zero[0]})" if zero else "")]


def _form_lines(report) -> list[str]:
    if not report.forms:
        return []
    head = "equivalence: max |logit difference| against the unmerged adapter"
    lines = [head + (f" (its effect on the base: {report.effect:.3g})" if report.effect is not None else "")]
    for f in report.forms:
        if f.ok is None:
            lines.append(f"  {f.form:<10} -  {f.note}")
        elif f.max_abs_diff is None:
            lines.append(f"  {f.form:<10} FAILED  {f.note}")
        else:
            verdict = "ok" if f.ok else "MISMATCH"
            lines.append(f"  {f.form:<10} {f.max_abs_diff:<9.3g} tolerance {f.tolerance:<8.3g} {verdict}"
                         + (f"  ({f.note})" if f.note else ""))
    return lines


def to_text(report) -> str:
    lines = [f"lorakit verify {report.adapter}: {'OK' if report.ok else 'FAILED'}"]
    lines += _coverage_lines(report) if report.coverage else []
    lines += _delta_lines(report)
    lines.append(f"keys matching no module: {len(report.unmatched)}"
                 + (f" (first: {report.unmatched[0]})" if report.unmatched else ""))
    lines += _form_lines(report)
    lines += [f"problem: {p}" for p in report.problems]
    return "\n".join(lines)
